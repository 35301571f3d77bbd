"""An independent re-computation of three training steps, compared with the run's checkpoints.

Everything here is written from the recipe, not from the trainer's objective or streams code:
the keyed random numbers are re-derived from the documented streams (numpy Philox keyed by the
first 16 bytes of sha256("selfflow/PURPOSE/SEED/KEY"), little-endian), in the documented order
(image order: a permutation per epoch under ``"train-order"``; ``"posterior/b"`` float32
normals for rows 16b to 16b + 15; ``"times"``: t, then s, then u, all float32 ``U[0, 1)``;
``"noise/b"`` like the posterior; ``"label-drop"``: ``U[0, 1) < p``),
each image is re-read with ``ds[i]``, and the loss, clipping, AdamW and EMA are plain torch.
Label dropout 0.3 and a clip norm of 0.05 make sure dropping and clipping both act.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from selfflow.data import LatentDataset
from selfflow.model.network import SelfFlowDiT
from selfflow.train.trainer import train

from .helpers import final_state, log_records, make_dataset, tiny_config

STEPS = 3


def keyed(seed: int, key: int, purpose: str) -> np.random.Generator:
    digest = hashlib.sha256(f"selfflow/{purpose}/{seed}/{key}".encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def normal(rng: np.random.Generator, shape) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))


def uniform(rng: np.random.Generator, shape) -> torch.Tensor:
    return torch.from_numpy(rng.random(shape, dtype=np.float32))


def blocked_normals(seed: int, step: int, purpose: str, shape) -> torch.Tensor:
    """The per-row tensors, drawn 16 rows per keyed stream."""
    rows = shape[0]
    return torch.cat(
        [
            normal(keyed(seed, step, f"{purpose}/{b}"), (min(16, rows - 16 * b), *shape[1:]))
            for b in range((rows + 15) // 16)
        ]
    )


def step_inputs(ds: LatentDataset, seed: int, step: int, batch: int, tokens: int, s) -> dict:
    """Clean latents, labels, noise and times of ``step``'s global batch, row by row."""
    n = len(ds)
    first = step * batch
    assert (first + batch - 1) // n == first // n  # one epoch: one permutation
    order = keyed(seed, first // n, "train-order")
    indices = order.permutation(n)[[p % n for p in range(first, first + batch)]]
    shape = (batch, *ds.latent_shape)
    posterior = blocked_normals(seed, step, "posterior", shape)
    times = keyed(seed, step, "times")
    t, u_s = uniform(times, batch), uniform(times, batch)
    u = uniform(times, (batch, tokens))
    noise = blocked_normals(seed, step, "noise", shape)
    drop = uniform(keyed(seed, step, "label-drop"), batch) < s.label_dropout
    x0, labels = [], []
    for row, index in enumerate(indices):
        mean, std, label = ds[int(index)]
        x0.append(float(ds.scale) * (torch.as_tensor(mean) + torch.as_tensor(std) * posterior[row]))
        labels.append(ds.num_classes if drop[row] else int(label))
    tau = torch.where(u < s.mask_ratio, u_s[:, None], t[:, None])
    return {
        "x0": torch.stack(x0).float(),
        "y": torch.tensor(labels),
        "noise": noise,
        "tau": tau,
        "tau_teacher": torch.minimum(t, u_s),
        "drops": int(drop.sum()),
    }


def noised(x0, noise, tau, patch: int):
    """``(1 − τ)·x0 + τ·ε`` with token ``row·g + col``'s τ over its ``patch × patch`` pixels."""
    b, _, h, w = x0.shape
    g = w // patch
    per_pixel = tau.reshape(b, h // patch, g).repeat_interleave(patch, 1)
    per_pixel = per_pixel.repeat_interleave(patch, 2)[:, None]
    return (1 - per_pixel) * x0 + per_pixel * noise


def test_three_steps_match_an_independent_recomputation(tmp_path):
    data = make_dataset(tmp_path / "ds", n=80)
    run = tmp_path / "run"
    config = tiny_config(
        data, run, steps=STEPS, checkpoint_every=1, keep_last=STEPS + 1,
        label_dropout=0.3, grad_clip=0.05, global_batch_size=24,  # 2 blocks of noise rows
    )  # fmt: skip
    train(config, log=lambda _: None)
    ds = LatentDataset(data)
    resolved = config.resolve(tuple(ds.latent_shape), ds.num_classes, 1)
    s, mc = resolved.settings, resolved.model
    assert mc.null_class == ds.num_classes and s.rep_weight > 0 and s.mask_ratio > 0
    with torch.random.fork_rng(devices=[]):
        init = hashlib.sha256(f"selfflow/init/{s.seed}/0".encode()).digest()
        torch.manual_seed(int.from_bytes(init[:4], "little"))  # the run's initial weights
        model = SelfFlowDiT(mc).float().train()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    logged = log_records(run)
    drops, clipped = 0, 0
    for step in range(STEPS):
        batch = step_inputs(ds, s.seed, step, s.global_batch_size, mc.num_tokens, s)
        x0, noise, y = batch["x0"], batch["noise"], batch["y"]
        xt = noised(x0, noise, batch["tau"], mc.patch_size)
        velocity, student = model(xt, batch["tau"], y, project_layer=s.student_layer)
        with torch.no_grad():
            tt = batch["tau_teacher"][:, None, None, None]
            teacher = ema(
                (1 - tt) * x0 + tt * noise,
                batch["tau_teacher"],
                y,
                hidden_layer=s.teacher_layer,
            )
        flow = ((velocity - (noise - x0)) ** 2).mean()
        rep = (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        loss = flow + s.rep_weight * rep
        optimizer.zero_grad()
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip))
        optimizer.step()
        with torch.no_grad():
            for average, live in zip(ema.parameters(), model.parameters(), strict=True):
                average.mul_(s.ema_decay).add_(live, alpha=1 - s.ema_decay)
        drops += batch["drops"]
        clipped += norm > s.grad_clip
        saved = final_state(run, step + 1)
        for part, ours in (("model", model), ("ema", ema)):
            for key, value in ours.state_dict().items():
                torch.testing.assert_close(
                    saved[part][key], value, rtol=1e-4, atol=1e-6, msg=f"step {step + 1} {key}"
                )
        value = float(loss.detach())
        assert abs(logged[step]["loss"] - value) <= 1e-5 * abs(value)
        assert abs(logged[step]["grad_norm"] - norm) <= 1e-5 * norm
    assert drops > 0 and clipped == STEPS  # both dropping and clipping took part
