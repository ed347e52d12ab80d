"""The trained network behind the :class:`~pipeline.diffusion.prior.Prior` interface.

Units: the network works in *network units* ``x``; physical images (the units of the training FITS
file and of the likelihood) are ``x_phys = scale * x + offset``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.diffusion.prior import Prior
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.diffusion.unet import UNet
from pipeline.errors import InputFileError
from pipeline.io.checkpoint import (FORMAT_VERSION, has_checkpoints, is_checkpoint_dir, load_checkpoint,
                                    write_checkpoint_dir)

log = logging.getLogger(__name__)


class NetworkPrior(Prior):
    """A frozen eps-prediction U-Net + its noise schedule + the brightness map.

    ``eps(x, t, cond=None)`` runs the net in eval mode under the caller's grad mode (DPS-style
    guidance needs d eps / d x); the net's own parameters are frozen (``requires_grad=False``):
    fine-tuning works on a copy (``copy.deepcopy(prior.net)``).

    ``cond`` is ``None``, a tensor (extra input channels, shape (B, cond_channels, H, W)) or a dict with
    keys ``image`` and/or ``vec`` (the UNet's ``cond_image`` / ``cond_vec``).
    """

    def __init__(self, net: UNet, schedule: NoiseSchedule, event_shape, scale: float = 1.0,
                 offset: float = 0.0, meta: dict | None = None):
        if scale <= 0:
            raise ValueError(f"brightness scale must be > 0, got {scale}")
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.schedule = schedule
        self.event_shape = tuple(int(s) for s in event_shape)
        self.scale, self.offset = float(scale), float(offset)
        self.meta = dict(meta or {})

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "NetworkPrior":
        self.net.to(device)
        return self

    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """eps-prediction at integer training timestep(s) t (scalar or (B,)); x in network units."""
        dev = self.device
        t = torch.as_tensor(t, dtype=torch.long, device=dev)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        cond_image = cond_vec = None
        if isinstance(cond, dict):
            cond_image, cond_vec = cond.get("image"), cond.get("vec")
        elif cond is not None:
            cond_image = cond
        if self.net.training:
            self.net.eval()
        out = self.net(x.to(device=dev, dtype=torch.float32), t,
                       None if cond_image is None else cond_image.to(dev),
                       None if cond_vec is None else cond_vec.to(dev))
        return out.to(dtype=x.dtype, device=x.device)

    def to_physical(self, x: torch.Tensor) -> torch.Tensor:
        """Network units -> physical units: scale * x + offset."""
        return self.scale * x + self.offset

    def to_network(self, x_phys: torch.Tensor) -> torch.Tensor:
        """Physical units -> network units: (x_phys - offset) / scale."""
        return (x_phys - self.offset) / self.scale


# -- checkpoints -----------------------------------------------------------------------
def prior_hparams(net, schedule, event_shape, scale: float, offset: float, **extra) -> dict:
    """The hparams.json content that :func:`load_prior` needs (plus free-form ``extra`` keys)."""
    h = {"kind": "network_prior", "format": FORMAT_VERSION, "unet": net.hparams(), "schedule": schedule.to_dict(),
         "event_shape": list(event_shape), "scale": float(scale), "offset": float(offset)}
    h.update(extra)
    return h


def export_prior(target, net_state: dict, hparams: dict) -> Path:
    """Write a minimal loadable prior directory (hparams.json + ema.pt + manifest.json)."""
    return write_checkpoint_dir(target, {"ema": net_state}, hparams)


def load_prior(path, device="cpu", use_ema: bool = True):
    """Rebuild a :class:`~pipeline.diffusion.network_prior.NetworkPrior` from a checkpoint alone.

    ``path``: a train-prior run directory (its ``final/`` export if present, else the newest readable
    step), a step directory, or an exported prior directory. EMA weights by default.
    """
    path = Path(path)
    name = "ema" if use_ema else "model"
    final = path / "final"
    if final.is_dir() and is_checkpoint_dir(final) and not is_checkpoint_dir(path) and use_ema:
        try:
            ckpt = load_checkpoint(final, names=[name], map_location="cpu")
        except InputFileError as exc:
            if not has_checkpoints(path):
                raise
            log.warning("%s; falling back to the newest readable step checkpoint", exc)
            ckpt = load_checkpoint(path, names=[name], map_location="cpu")
    else:
        ckpt = load_checkpoint(path, names=[name], map_location="cpu")
    h = ckpt.hparams
    if h.get("kind") != "network_prior":
        raise InputFileError(ckpt.path / "hparams.json", f"not a diffusion prior checkpoint (kind={h.get('kind')!r})",
                             field="kind")
    try:
        net = UNet(**h["unet"])
        net.load_state_dict(ckpt.states[name])
        schedule = NoiseSchedule(**h["schedule"])
        prior = NetworkPrior(net, schedule, h["event_shape"], scale=h["scale"], offset=h["offset"],
                             meta={"checkpoint": str(ckpt.path), "step": ckpt.step, **{
                                 k: v for k, v in h.items() if k not in ("unet", "schedule")}})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputFileError(ckpt.path, f"checkpoint does not match its hparams.json ({msg})") from None
    return prior.to(device)
