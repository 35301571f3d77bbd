"""The base: small things every room shares (files, locks, seeds, processes, downloads,
errors). It imports no other part of selfflow."""
