"""Drop the fused kernels into existing ResNets: ``convert(model)`` / ``revert(model)``.

Recognised blocks (torchvision and timm ``BasicBlock`` / ``Bottleneck``, exact classes) get their class
swapped for a fused subclass whose ``forward`` calls the fused ops; parameters, buffers and ``state_dict``
are untouched. Blocks whose tail activation is not ReLU, and subclasses (whatever they override), are left
alone; :func:`conversion_report` says which blocks were converted and why others were not, and which
converted blocks run their original forward at the moment (hooks on skipped modules, global hooks).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

from torch import nn

log = logging.getLogger("fused_residual")


def _families():
    """Block tables of the libraries that are installed: {original class: (fused class, why_not, name)}."""
    blocks = {}
    for name in ("torchvision", "timm"):
        try:
            module = __import__(f"fused_residual.integrations.{name}", fromlist=["BLOCKS"])
        except ImportError:  # that library is not installed
            continue
        except Exception as exc:  # installed but broken (e.g. built for another torch): say so, go on
            log.warning("fused_residual: %s blocks not recognised: importing %s failed: %s", name, name, exc)
            continue
        blocks.update(module.BLOCKS)
    return blocks


@dataclass
class ConversionReport:
    converted: list[tuple[str, str]] = field(default_factory=list)  # (module name, block kind)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (module name, block kind, reason)
    # converted blocks that run their original forward at the moment (hooks): (module name, kind, reason)
    unfused_now: list[tuple[str, str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, kind in self.converted:
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def __str__(self) -> str:
        done = ", ".join(f"{n} x {kind}" for kind, n in sorted(self.counts().items())) or "none"
        lines = [f"fused_residual: converted {len(self.converted)} blocks ({done}); skipped {len(self.skipped)}"]
        lines += [f"  skipped {name} ({kind}): {why}" for name, kind, why in self.skipped]
        lines += [f"  converted {name} ({kind}) runs its original forward now: {why}"
                  for name, kind, why in self.unfused_now]
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> ConversionReport:
    """Which residual blocks of ``model`` run fused, and why the recognised-but-skipped ones do not."""
    blocks = _families()
    fused = {v[0]: (base, v[2]) for base, v in blocks.items()}
    report = ConversionReport()
    for name, m in model.named_modules():
        t = type(m)
        if t in fused:
            base, kind = fused[t]
            report.converted.append((name, kind))
            why = blocks[base][1](m)  # at this moment: hooks send a block back to its original forward
            if why:
                report.unfused_now.append((name, kind, why))
        elif t in blocks:
            report.skipped.append((name, blocks[t][2], blocks[t][1](m, now=False)
                                   or "not converted (revert or new block)"))
        else:
            for base, (_, _, kind) in blocks.items():
                if isinstance(m, base):
                    why = f"subclass {t.__qualname__} (only the exact block classes are converted)"
                    report.skipped.append((name, kind, why))
                    break
    return report


def convert(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Swap the recognised residual blocks of ``model`` for their fused forms; returns the model.

    With ``inplace=False`` a deep copy is converted and the original left as it was. The summary is logged
    on the ``fused_residual`` logger (INFO) and available from :func:`conversion_report`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    blocks = _families()
    for m in model.modules():
        entry = blocks.get(type(m))
        if entry is not None and entry[1](m, now=False) is None:  # structure only: hooks are asked per call
            m.__class__ = entry[0]
    log.info("%s", conversion_report(model))
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: every fused block gets its original class (and forward) back."""
    originals = {v[0]: base for base, v in _families().items()}
    for m in model.modules():
        base = originals.get(type(m))
        if base is not None:
            m.__class__ = base
    return model
