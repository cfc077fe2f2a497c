"""The MIL heads, one module each; importing a module registers its head(s) in :mod:`mil.registry`.

``HEADS`` is the explicit list: registry name -> (module, one-line description). It imports nothing, so the
CLI's choices and help come from it without torch; a head registered under a name missing here is an error
(``register_model``), and a test checks that every name here is registered by its module.
"""

from __future__ import annotations

HEADS: dict[str, tuple[str, str]] = {
    "abmil": ("abmil", "gated-attention MIL (Ilse et al. 2018)"),
    "clam_sb": ("clam", "CLAM single-branch with instance clustering (Lu et al. 2021)"),
    "clam_mb": ("clam", "CLAM multi-branch, one attention branch per class (Lu et al. 2021)"),
    "dsmil": ("dsmil", "dual-stream MIL (Li et al. 2021)"),
    "transmil": ("transmil", "Nystrom transformer with PPEG (Shao et al. 2021)"),
    "dtfd": ("dtfd", "double-tier feature distillation, AFS (Zhang et al. 2022)"),
    "mean": ("pooling", "baseline: mean of embedded instances"),
    "max": ("pooling", "baseline: max of instance logits"),
}


def head_names() -> list[str]:
    """Registered head names, sorted (the CLI's choices)."""
    return sorted(HEADS)


def head_help() -> str:
    """One entry per head for --help texts: ``name (description)``."""
    return "; ".join(f"{name} ({HEADS[name][1]})" for name in head_names())
