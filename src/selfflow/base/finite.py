"""Which samples went NaN or inf on the sampling path, found once and reported one way.

A bad sample is a row of a batch with any non-finite value. Two places look: the sampler after
each step (:class:`FirstNonFinite`, which keeps its flags on the device so that no step waits
for the host) and the decoder's uint8 mapping (:func:`check_rows`). Each raises
:class:`NonFiniteSamplesError` naming the rows it saw; a caller that knows what the rows are
(the pipeline knows each row's sample index, the FID batch's writer its shard indices)
re-raises it under those names with :meth:`NonFiniteSamplesError.renamed`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from selfflow.base.errors import SelfFlowError

_MAX_LISTED = 20


class NonFiniteSamplesError(SelfFlowError, FloatingPointError):
    """Sampling or decoding produced NaN or inf for these samples.

    ``indices`` are sorted and unique; ``what`` says what they number (``"batch rows"`` where the
    raiser only knows positions, ``"sample indices"`` once a caller has renamed them).
    """

    def __init__(
        self,
        indices: Sequence[int],
        where: str,
        *,
        what: str = "sample indices",
        detail: str = "",
    ) -> None:
        self.indices = sorted({int(i) for i in indices})
        self.where, self.what, self.detail = where, what, detail
        shown = ", ".join(map(str, self.indices[:_MAX_LISTED]))
        more = len(self.indices) - _MAX_LISTED
        listing = f"[{shown}{f', … {more} more' if more > 0 else ''}]"
        super().__init__(f"{where} produced NaN or inf for {what} {listing}{detail}")

    def renamed(self, names: Sequence[int], *, detail: str | None = None) -> NonFiniteSamplesError:
        """The same failure with each row ``r`` reported as sample index ``names[r]`` (repeats
        merge); ``detail`` replaces the raiser's when given."""
        return NonFiniteSamplesError(
            [int(names[row]) for row in self.indices],
            self.where,
            detail=self.detail if detail is None else detail,
        )

    def explained(self, extra: str) -> NonFiniteSamplesError:
        """The same failure with ``extra`` added to the message (what the caller did about it)."""
        return NonFiniteSamplesError(
            self.indices, self.where, what=self.what, detail=self.detail + extra
        )


def bad_rows(values: torch.Tensor) -> torch.Tensor:
    """A bool per leading row: does it hold any NaN or inf? Stays on ``values``' device."""
    return ~torch.isfinite(values).reshape(values.shape[0], -1).all(dim=1)


def check_rows(values: torch.Tensor, where: str) -> None:
    """Raise :class:`NonFiniteSamplesError` naming the rows of ``values`` that are not finite.

    One host synchronisation; for per-step checks inside a loop use :class:`FirstNonFinite`.
    """
    bad = bad_rows(values)
    if bool(bad.any()):
        raise NonFiniteSamplesError(bad.nonzero().flatten().tolist(), where, what="batch rows")


class FirstNonFinite:
    """For each row, the first step after which it was not finite, kept on the device.

    ``update`` costs one small reduction per step and never synchronises; ``check`` reads the
    flags once, at the end of sampling, and names every bad row and the earliest bad step.
    """

    def __init__(self, rows: int, device: torch.device) -> None:
        self.first = torch.full((rows,), -1, dtype=torch.int64, device=device)

    def update(self, values: torch.Tensor, step: int) -> None:
        newly = bad_rows(values) & (self.first < 0)
        self.first = torch.where(newly, step, self.first)

    def check(self, where: str, describe: Callable[[int], str], hint: str = "") -> None:
        first = self.first.cpu()
        rows = (first >= 0).nonzero().flatten().tolist()
        if rows:
            step = int(first[rows].min())
            detail = f", first at {describe(step)}{f'; {hint}' if hint else ''}"
            raise NonFiniteSamplesError(rows, where, what="batch rows", detail=detail)
