"""Config sections ``lensing:`` (geometry, sources, lens ranges, noise, brightness map, observation IO),
``posterior:`` (:class:`PosteriorConfig`, amortized training set-up and sampling defaults) and
``calibration:`` (:class:`CalibrationConfig`, the size of the calibration sets).

Units: angles in arcsec, position angles in radians counter-clockwise from +x (array frame: +x along
increasing column, +y along increasing row, origin at the array centre). Source maps are surface
brightness in ``sources.bunit`` (default electron/s/arcsec^2); SCI images written by the simulator
are flux per pixel (``noise.bunit``, default electron/s) = mean surface brightness x pixel area.

CPU default geometry: image 32x32 at 0.1"/px, source 32x32 at 0.05"/px (1.6" field,
which holds the 0.5-0.9" Einstein radius caustics with room for extended sources), supersampling 2,
Gaussian PSF FWHM 0.15". The paper config uses 64x64 image and source at the same scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import from_mapping, load_yaml, param
from pipeline.errors import ConfigError


def _range(source, name, value, lo=None, hi=None):
    a, b = value
    if a > b:
        raise ConfigError(source, name, f"range [{a}, {b}] has min > max")
    if lo is not None and a < lo:
        raise ConfigError(source, name, f"range must be >= {lo}, got {a}")
    if hi is not None and b > hi:
        raise ConfigError(source, name, f"range must be <= {hi}, got {b}")


@dataclass
class GeometryConfig:
    """Image and source pixel grids, supersampling and the default Gaussian PSF (angles in arcsec)."""

    image_npix: int = param(32, "Side of the square observed image.", "pixel", min=4, max=1024)
    image_pixscale: float = param(0.1, "Pixel scale of the observed image.", "arcsec/pixel", gt=0)
    source_npix: int = param(32, "Side of the square source grid the prior models.", "pixel", min=4, max=1024)
    source_pixscale: float = param(0.05, "Pixel scale of the source grid.", "arcsec/pixel", gt=0)
    supersample: int = param(2, "Sub-pixels per image pixel along each axis; the model image is their average.",
                             min=1, max=16)
    psf_fwhm: float = param(0.15, "FWHM of the default Gaussian PSF; 0 means no PSF.", "arcsec", min=0)
    psf_npix: int = param(11, "Side of the PSF kernel on the supersampled grid; must be odd.", "pixel",
                          min=1, max=255)

    def validate(self, source, prefix):
        if self.psf_npix % 2 == 0:
            raise ConfigError(source, prefix + "psf_npix", f"must be odd, got {self.psf_npix}")


@dataclass
class GalSimConfig:
    """Parametric galaxies: Sersic bulge + exponential disk + RandomKnots, convolved with a small
    Gaussian (knots are delta functions). Each ``[min, max]`` range is drawn uniformly per galaxy unless
    stated; sizes are half-light radii in arcsec."""

    flux: tuple[float, float] = param((20.0, 100.0), "[min, max] range of the total flux, drawn log-uniformly.",
                                      "electron/s")
    bulge_fraction: tuple[float, float] = param((0.0, 0.6), "[min, max] range of the bulge's share of the flux.")
    bulge_n: tuple[float, float] = param((1.5, 4.0), "[min, max] range of the bulge's Sersic index.")
    bulge_hlr: tuple[float, float] = param((0.04, 0.12), "[min, max] range of the bulge half-light radius.",
                                           "arcsec")
    disk_hlr: tuple[float, float] = param((0.10, 0.30), "[min, max] range of the disk half-light radius.", "arcsec")
    knots_fraction: tuple[float, float] = param((0.0, 0.4), "[min, max] range of the disk flux's share in knots.")
    n_knots: tuple[int, int] = param((5, 30), "[min, max] range of the number of star-forming knots.")
    ellipticity: tuple[float, float] = param((0.0, 0.6), "[min, max] range of the disk's reduced shear |g|; the bulge "
                                             "gets half.")
    offset: float = param(0.1, "Largest centre offset from the grid centre, per axis.", "arcsec", min=0)
    smooth_fwhm: float = param(0.05, "FWHM of the Gaussian convolved in, so the point-like knots are resolved.",
                               "arcsec", gt=0)

    def validate(self, source, prefix):
        _range(source, prefix + "flux", self.flux, lo=1e-12)
        _range(source, prefix + "bulge_fraction", self.bulge_fraction, 0, 1)
        _range(source, prefix + "bulge_n", self.bulge_n, 0.3, 6.2)
        _range(source, prefix + "bulge_hlr", self.bulge_hlr, lo=1e-4)
        _range(source, prefix + "disk_hlr", self.disk_hlr, lo=1e-4)
        _range(source, prefix + "knots_fraction", self.knots_fraction, 0, 1)
        _range(source, prefix + "n_knots", self.n_knots, lo=1)
        _range(source, prefix + "ellipticity", self.ellipticity, 0, 0.95)


@dataclass
class HSTConfig:
    """Real galaxy stamps cut from skimage.data.hubble_deep_field(): only their shapes are used; the
    flux is drawn here."""

    flux: tuple[float, float] = param((20.0, 100.0), "[min, max] range of the total flux, drawn log-uniformly.",
                                      "electron/s")
    max_masked_fraction: float = param(0.2, "Largest share of a target's segment that neighbours may cover; "
                                       "more crowded targets are skipped.", min=0, max=1)
    min_area: int = param(20, "Smallest detected area of a target, in deep-field pixels.", "pixel", min=1)
    zoom: float = param(1.0, "Source pixels per deep-field pixel; above 1 the galaxies look larger.",
                        min=0.25, max=8)

    def validate(self, source, prefix):
        _range(source, prefix + "flux", self.flux, lo=1e-12)


@dataclass
class SourcesConfig:
    """The source-galaxy cube: counts per kind, split fractions and the seed of the draws and the split.
    Maps are surface brightness in ``bunit`` on the geometry's source grid."""

    seed: int = param(0, "Seed of the galaxy draws, the stamp subset and the TRAIN/VALID/TEST split.")
    n_galsim: int = param(400, "Number of parametric GalSim galaxies.", min=0)
    n_hst: int = param(400, "Number of deep-field stamps: -1 every usable stamp, 0 none.", min=-1)
    user_cube: str | None = param(None, "Path of your own FITS cube (N, ny, nx) with a PIXSCALE keyword, "
                                  "added to the sources; null for none.")
    user_hdu: str | None = param(None, "HDU name of that cube; null takes the first image HDU.")
    split: tuple[float, float, float] = param((0.8, 0.1, 0.1), "TRAIN, VALID and TEST fractions, summing to 1.")
    bunit: str = param("electron/(s arcsec2)", "Surface-brightness unit written to the source maps (BUNIT).")
    galsim: GalSimConfig = param(GalSimConfig, "Parametric galaxy settings.")
    hst: HSTConfig = param(HSTConfig, "Deep-field stamp settings.")

    def validate(self, source, prefix):
        if any(f < 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError(source, prefix + "split", f"fractions must be >= 0 and sum to 1, got {list(self.split)}")


@dataclass
class LensConfig:
    """The lens prior that the simulator and the amortized training draw from.

    Each parameter is uniform in its range and the shear is a normal truncated to a disc; angles in
    arcsec, position angles in rad. Its density is :mod:`pipeline.lensing.lens_prior`."""

    model: str = param("SIE", "Main deflector: singular isothermal ellipsoid or elliptical power law.",
                       choices=["SIE", "EPL"])
    rein: tuple[float, float] = param((0.5, 0.9), "[min, max] range of the Einstein radius.", "arcsec")
    q: tuple[float, float] = param((0.6, 0.95), "[min, max] range of the axis ratio.")
    phi: tuple[float, float] = param((0.0, math.pi), "[min, max] range of the position angle, counter-clockwise "
                                     "from +x.", "rad")
    center: float = param(0.05, "Largest |x0| and |y0| of the lens centre.", "arcsec", min=0)
    t: tuple[float, float] = param((0.9, 1.1), "[min, max] range of the EPL slope t (1 = isothermal); "
                                   "EPL only.")
    shear_sigma: float = param(0.05, "Standard deviation of each external-shear component gamma_1, gamma_2, "
                               "before the truncation to shear_max.", min=0)
    shear_max: float = param(0.15, "Largest shear amplitude |gamma|: the normal is truncated to this disc "
                             "(larger draws are redrawn).", min=0)
    z_lens: float = param(0.5, "Lens redshift.", gt=0)
    z_source: float = param(1.5, "Source redshift; must exceed z_lens.", gt=0)

    def validate(self, source, prefix):
        _range(source, prefix + "rein", self.rein, lo=1e-6)
        _range(source, prefix + "q", self.q, lo=0.05, hi=1.0)
        _range(source, prefix + "phi", self.phi)
        _range(source, prefix + "t", self.t, lo=0.05, hi=1.95)
        if self.z_source <= self.z_lens:
            raise ConfigError(source, prefix + "z_source", f"must exceed z_lens={self.z_lens}")


@dataclass
class NoiseConfig:
    """Noise map. ``sigma`` fixed in SCI units (flux per pixel), or null: sigma = median over up to 128
    TRAIN sources (each lensed by a lens drawn from the ranges with a fixed seed) of the noiseless image
    peak / ``target_peak_snr``. Either way sigma is independent of each truth. ``poisson``
    adds the source's Poisson variance (realism sets only: it leaks the truth into NOISE)."""

    sigma: float | None = param(None, "Gaussian noise standard deviation per pixel, in noise.bunit; null sets "
                                "it from target_peak_snr.", "electron/s", gt=0)
    target_peak_snr: float = param(25.0, "Typical peak signal-to-noise ratio of the noiseless image that sets "
                                   "sigma when sigma is null.", gt=0)
    poisson: bool = param(False, "Add the source's Poisson variance; for realism sets only, since it leaks "
                          "the truth into NOISE.")
    exposure_time: float = param(1000.0, "Exposure time of the Poisson term.", "s", gt=0)
    bunit: str = param("electron/s", "Unit of the SCI and NOISE images, flux per pixel (BUNIT).")


@dataclass
class BrightnessConfig:
    """Network units to physical surface brightness (in ``sources.bunit``): x_phys = scale * x + offset."""

    scale: float = param(1.0, "Physical surface brightness per network unit.", "electron/(s arcsec2)", gt=0)
    offset: float = param(0.0, "Physical surface brightness at network value 0.", "electron/(s arcsec2)")


@dataclass
class ObservationConfig:
    """Checks applied when reading observation FITS files."""

    nan_policy: str = param("mask", "What a NaN or infinite pixel does: mask it out, or raise an error.",
                            choices=["mask", "error"])
    psf_sum_tol: float = param(0.01, "Largest allowed |sum(PSF) - 1| of a file's PSF.", gt=0)
    gain: float = param(1.0, "Electrons per count (DN), used when a file's unit is in counts or DN (also after "
                        "PHOTMJSR, which gives DN/s).", "electron/count", gt=0)
    wht: str = param("header", "How a WHT extension is read: as an inverse variance only when its WHTTYPE says "
                     "IVM (header), or always (ivm); HST drizzle's default WHT is an exposure-time map.",
                     choices=["header", "ivm"])
    rebin: str = param("off", "Sum k x k pixels (noise in quadrature) when the file's pixel scale is the "
                       "geometry's image_pixscale / k for an integer k >= 2 (auto), or keep the file's pixels.",
                       choices=["off", "auto"])
    crop: str = param("off", "Cut a larger image to image_npix x image_npix around the array centre or the lens "
                      "centre, after any rebinning, or keep it whole.", choices=["off", "centre", "lens"])
    max_image_npix: int = param(256, "Largest image side accepted after rebinning and cropping; larger images "
                                "are refused before the lens operator, whose cost grows with the pixel count, "
                                "is built.", "pixel", min=4)
    max_noise_ratio: float = param(1.0e5, "Largest ratio, either way, between SCI's robust pixel scatter and "
                                   "the median noise before a file is refused as having SCI and noise in "
                                   "different units or scales (bright, well-exposed images reach 10^3).", gt=1)


@dataclass
class LensingConfig:
    """The whole ``lensing:`` section: grids, sources, lens ranges, noise, brightness map and
    observation IO, with the conventions of this module's docstring."""

    geometry: GeometryConfig = param(GeometryConfig, "Image and source grids and the PSF.")
    sources: SourcesConfig = param(SourcesConfig, "The source-galaxy cube.")
    lens: LensConfig = param(LensConfig, "Ranges of the lens parameters.")
    noise: NoiseConfig = param(NoiseConfig, "Noise of simulated observations.")
    brightness: BrightnessConfig = param(BrightnessConfig, "Map from network units to surface brightness.")
    observation: ObservationConfig = param(ObservationConfig, "Checks when reading observation files.")
    simulate_seed: int = param(1234, "Seed of the lens and noise draws of simulated observations; the "
                               "prior-drawn set uses simulate_seed + 1.")


@dataclass
class CalibrationConfig:
    """Section ``calibration:``: the size of each calibration set (prior-drawn and held-out)."""

    n_obs: int = param(16, "Observations per set.", min=1)
    n_samples: int = param(32, "Posterior samples per observation and method.", "samples", min=2)


def load_lensing_config(path) -> LensingConfig:
    """Read the ``lensing:`` section of the YAML config at ``path`` (defaults when absent)."""
    data = load_yaml(path)
    section = data.get("lensing", {}) or {}
    if not isinstance(section, dict):
        raise ConfigError(path, "lensing", "expected a mapping")
    return from_mapping(LensingConfig, section, path, prefix="lensing.")


def check_rtb_for_lensing(rcfg, path) -> None:
    """The ``rtb:`` settings the lensing posterior supports, checked before any work: it is amortized
    over many lenses, and the DPS-guided exploration rollouts (``rtb.exploration.dps_rate``) need one forward
    operator for the whole batch, which a batch of mixed lenses does not have."""
    if not rcfg.objective.amortized:
        raise ConfigError(path, "rtb.objective.amortized", "the lensing posterior is amortized: set it to true")
    if rcfg.exploration.dps_rate > 0:
        raise ConfigError(path, "rtb.exploration.dps_rate", "DPS-guided exploration is not supported for the "
                          f"amortized lensing posterior (a batch mixes lenses); set it to 0 (got {rcfg.exploration.dps_rate})")


_GUARD_POLICY = ["warn", "error"]


def _policy(default, what):
    return param(default, f"What an observation outside the trained {what} does: warn (log and OODWARN "
                 "header cards) or error (refused before sampling).", choices=_GUARD_POLICY)


@dataclass
class GuardConfig:
    """Section ``posterior.guard``: what happens when an observation lies outside a condition the amortized
    posterior was trained on (its ``trained_on`` record). ``error`` by default where the network cannot
    represent the observation (another image grid, pixel scale or source grid), ``warn`` elsewhere."""

    image_grid: str = _policy("error", "image grid")
    pixel_scale: str = _policy("error", "image pixel scale")
    source_grid: str = _policy("error", "source grid")
    supersample: str = _policy("warn", "supersampling")
    psf: str = _policy("warn", "PSF FWHM")
    noise: str = _policy("warn", "noise level")
    lens_model: str = _policy("warn", "lens model")
    lens_rein: str = _policy("warn", "Einstein-radius range")
    lens_q: str = _policy("warn", "axis-ratio range")
    lens_phi: str = _policy("warn", "position-angle range")
    lens_center: str = _policy("warn", "lens-centre range")
    lens_slope: str = _policy("warn", "EPL-slope range")
    lens_shear: str = _policy("warn", "shear maximum")
    mask: str = _policy("warn", "masked fraction")
    peak_snr: str = _policy("warn", "peak-SNR range")
    flux: str = _policy("warn", "image-flux range")
    pixscale_rtol: float = param(1e-3, "Relative tolerance on the image and source pixel scales.", min=0)
    psf_rtol: float = param(0.1, "Relative tolerance on the PSF FWHM.", min=0)
    noise_rtol: float = param(0.1, "Relative tolerance on the median noise level against the trained range.",
                              min=0)
    mask_slack: float = param(0.02, "Masked fraction allowed beyond the trained one (a few bad pixels).",
                              min=0, max=1)


@dataclass
class PosteriorConfig:
    """Section ``posterior:``: amortized training set-up and sampling defaults of the lensing posterior."""

    n_lenses: int = param(32, "Lens operators in the training pool, drawn from the lens ranges.", min=1)
    n_truths: int = param(256, "Prior-chain truths in the training pool.", "samples", min=1)
    n_samples: int = param(64, "Posterior samples per observation.", "samples", min=2)
    batch_size: int = param(64, "Trajectories per network call when sampling.", "samples", min=1)
    particles: int = param(8, "Particles per returned sample: importance resampling (prior_is, rtb_amortized_is) "
                           "or one twisted SMC run (rtb_amortized_smc).", min=1)
    fps_smc_mode: str = param("runs", "FPS-SMC: one independent run per returned sample (calibrated intervals), "
                              "or one weighted run of n_samples particles (a cheap mean; intervals too narrow).",
                              choices=["runs", "weighted"])
    fps_smc_particles: int = param(2, "FPS-SMC particles per run (runs mode only).", min=1)
    guidance_scales: dict = param({"dps": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05],
                                   "dps_cla": [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]},
                                  "Guidance-scale grid per tuned method, searched on tune_seed; a method left "
                                  "out uses pipeline.samplers.tuning.DEFAULT_GRIDS.")
    tune_objective: str = param("chi2", "Objective of the guidance-scale search: chi2 calibrates the data fit; "
                                "on lensing the ELBO favours vanishing DPS guidance, which leaves DPS at the prior.",
                                choices=["chi2", "elbo", "log_r"])
    tune_seed: int = param(987654, "Seed of the tuning observations, apart from every trained and evaluated set.",
                           min=0)
    seed: int = param(0, "Seed of the training pools and the default sampling seed.", min=0)
    guard: GuardConfig = param(GuardConfig, "What sample, inspect and the user target do with an observation "
                               "outside the posterior's trained conditions.")
