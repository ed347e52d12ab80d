"""``python -m pipeline sample-prior``: ancestral samples of a trained prior's chain into FITS."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.description = (
        "Draw samples x0 = f(x_1) from the strided K-step reverse chain of a trained prior and write them "
        "to FITS (HDU SAMPLES, (n, H, W) or (n, C, H, W), physical units scale*x+offset) with provenance "
        "in the primary header; optionally a PNG grid.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="train-prior run directory (uses final/ or the newest readable step), a step-N "
                             "directory or an exported prior directory")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--out", required=True, metavar="FILE.fits", help="output FITS file (written atomically)")
    parser.add_argument("--K", type=int, help="chain length (default: the checkpoint's sample_K)")
    parser.add_argument("--variance", choices=["small", "large"],
                        help="reverse-step variance: small=beta-tilde, large=beta (default: checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch (default 64)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--png", metavar="FILE.png", help="also write a PNG grid of (up to 64) samples")


def save_grid_png(images: np.ndarray, path, max_images: int = 64, title: str | None = None) -> None:
    """Square grid of (n, H, W) or (n, C, H, W) images (first channel), each with its own colour range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = images[:max_images]
    if imgs.ndim == 4:
        imgs = imgs[:, 0] if imgs.shape[1] != 3 else np.clip(imgs.transpose(0, 2, 3, 1), 0, None)
    n = len(imgs)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + (0.3 if title else 0)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            img = imgs[i]
            if img.ndim == 3:
                img = img / max(float(img.max()), 1e-12)
            ax.imshow(img, origin="lower", cmap="magma", interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, wspace=0.04, hspace=0.04,
                        top=1 - (0.3 / (1.2 * rows + 0.3) if title else 0.005))
    from pipeline.io.atomic import atomic_file

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def run(args) -> int:
    from astropy.io import fits

    import pipeline
    from pipeline.diffusion.sampling import sample_prior
    from pipeline.errors import ConfigError
    from pipeline.diffusion.network_prior import load_prior
    from pipeline.io.fits import write_fits_atomic
    from pipeline.runtime import choose_device, configure_threads, seed_everything

    configure_threads()
    if args.n < 1:
        raise ConfigError("--n", "n", f"must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", "batch_size", f"must be >= 1, got {args.batch_size}")
    device = choose_device(args.device)
    prior = load_prior(args.checkpoint, device=device)
    K = args.K or int(prior.meta.get("sample_K", 50))
    variance = args.variance or prior.meta.get("sample_variance", "small")
    if not 2 <= K <= prior.schedule.T:
        raise ConfigError("--K", "K", f"must be in [2, {prior.schedule.T}], got {K}")
    chain = prior.schedule.chain(K, variance)
    gen = seed_everything(args.seed)
    log.info("sampling %d images from %s with K=%d (%s variance) on %s", args.n, args.checkpoint, K, variance, device)
    x = sample_prior(prior, chain, args.n, generator=gen, batch_size=args.batch_size, device=device)
    phys = prior.to_physical(x).cpu().numpy().astype(np.float32)
    if phys.shape[1] == 1:
        phys = phys[:, 0]
    hdr = fits.Header()
    hdr["ORIGIN"] = ("lensing-rtb-pipeline", "software that wrote this file")
    hdr["PKGVER"] = (pipeline.__version__, "pipeline package version")
    hdr["COMMAND"] = "sample-prior"
    hdr["CKPT"] = str(Path(args.checkpoint).resolve())  # may be long: no comment, CONTINUE cards
    hdr["CKSTEP"] = (int(prior.meta.get("step", -1)), "training step of the checkpoint")
    hdr["CFGHASH"] = (str(prior.meta.get("config_hash", "")), "prior config hash")
    hdr["SEED"] = (args.seed, "sampling seed")
    hdr["CHAIN_K"] = (K, "reverse chain length")
    hdr["CHAINVAR"] = (variance, "reverse variance: small=beta-tilde, large=beta")
    hdr["NSAMPLE"] = args.n
    hdr["SCALE"] = (prior.scale, "x_phys = SCALE * x_net + OFFSET")
    hdr["OFFSET"] = prior.offset
    data_meta = prior.meta.get("data") or {}
    shdr = fits.Header()
    if data_meta.get("bunit"):
        shdr["BUNIT"] = data_meta["bunit"]
    if data_meta.get("pixscale") is not None:
        shdr["PIXSCALE"] = (float(data_meta["pixscale"]), "arcsec/pixel (from the training data)")
    write_fits_atomic(args.out, [fits.PrimaryHDU(header=hdr), fits.ImageHDU(phys, header=shdr, name="SAMPLES")])
    log.info("wrote %s", args.out)
    if args.png:
        save_grid_png(phys, args.png, title=f"prior samples, K={K}")
        log.info("wrote %s", args.png)
    return 0
