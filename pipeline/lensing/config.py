"""Config sections ``lensing:`` (geometry, sources, lens ranges, noise, brightness map, observation IO)
and ``posterior:`` (:class:`PosteriorConfig`, amortized training set-up and sampling defaults).

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
from dataclasses import dataclass, field

from pipeline.config import from_mapping, load_yaml
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
    """Image and source grids, supersampling and the default Gaussian PSF."""

    image_npix: int = field(default=32, metadata={"min": 4, "max": 1024})
    image_pixscale: float = field(default=0.1, metadata={"gt": 0})       # arcsec/pixel
    source_npix: int = field(default=32, metadata={"min": 4, "max": 1024})
    source_pixscale: float = field(default=0.05, metadata={"gt": 0})     # arcsec/pixel
    supersample: int = field(default=2, metadata={"min": 1, "max": 16})
    psf_fwhm: float = field(default=0.15, metadata={"min": 0})           # arcsec; 0 = no PSF
    psf_npix: int = field(default=11, metadata={"min": 1, "max": 255})   # odd, supersampled pixels

    def validate(self, source, prefix):
        if self.psf_npix % 2 == 0:
            raise ConfigError(source, prefix + "psf_npix", f"must be odd, got {self.psf_npix}")


@dataclass
class GalSimConfig:
    """Parametric galaxies: Sersic bulge + exponential disk + RandomKnots, convolved with a small
    Gaussian (knots are delta functions). Sizes are half-light radii in arcsec."""

    flux: tuple[float, float] = (20.0, 100.0)           # total flux [electron/s], log-uniform
    bulge_fraction: tuple[float, float] = (0.0, 0.6)
    bulge_n: tuple[float, float] = (1.5, 4.0)           # Sersic index
    bulge_hlr: tuple[float, float] = (0.04, 0.12)
    disk_hlr: tuple[float, float] = (0.10, 0.30)
    knots_fraction: tuple[float, float] = (0.0, 0.4)    # share of the disk flux in knots
    n_knots: tuple[int, int] = (5, 30)
    ellipticity: tuple[float, float] = (0.0, 0.6)       # |g| reduced shear of the shape
    offset: float = field(default=0.1, metadata={"min": 0})  # max |centre offset| per axis, arcsec
    smooth_fwhm: float = field(default=0.05, metadata={"gt": 0})  # Gaussian convolved in, arcsec

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
    """Real stamps cut from skimage.data.hubble_deep_field(): shapes only; flux set here."""

    flux: tuple[float, float] = (20.0, 100.0)   # total flux [electron/s], log-uniform
    max_masked_fraction: float = field(default=0.2, metadata={"min": 0, "max": 1})
    min_area: int = field(default=20, metadata={"min": 1})  # detected pixels of the target
    zoom: float = field(default=1.0, metadata={"min": 0.25, "max": 8})  # source pixels per HDF pixel

    def validate(self, source, prefix):
        _range(source, prefix + "flux", self.flux, lo=1e-12)


@dataclass
class SourcesConfig:
    """The source-galaxy cube: counts per kind, split fractions and the split seed."""

    seed: int = 0
    n_galsim: int = field(default=400, metadata={"min": 0})
    n_hst: int = field(default=400, metadata={"min": -1})  # -1 = every usable stamp, 0 = none
    user_cube: str | None = None                          # FITS cube (N, ny, nx) with PIXSCALE
    user_hdu: str | None = None                           # HDU name (default: first image HDU)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)   # TRAIN, VALID, TEST
    bunit: str = "electron/(s arcsec2)"
    galsim: GalSimConfig = field(default_factory=GalSimConfig)
    hst: HSTConfig = field(default_factory=HSTConfig)

    def validate(self, source, prefix):
        if any(f < 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError(source, prefix + "split", f"fractions must be >= 0 and sum to 1, got {list(self.split)}")


@dataclass
class LensConfig:
    """Ranges the simulator draws lens parameters from (uniform unless stated)."""

    model: str = field(default="SIE", metadata={"choices": ["SIE", "EPL"]})
    rein: tuple[float, float] = (0.5, 0.9)          # Einstein radius, arcsec
    q: tuple[float, float] = (0.6, 0.95)            # axis ratio
    phi: tuple[float, float] = (0.0, math.pi)       # position angle, rad
    center: float = field(default=0.05, metadata={"min": 0})  # max |x0|, |y0|, arcsec
    t: tuple[float, float] = (0.9, 1.1)             # EPL slope (caustics t; 1 = isothermal)
    shear_sigma: float = field(default=0.05, metadata={"min": 0})  # gamma_1, gamma_2 ~ N(0, s^2)
    shear_max: float = field(default=0.15, metadata={"min": 0})    # |gamma| clipped here
    z_lens: float = field(default=0.5, metadata={"gt": 0})
    z_source: float = field(default=1.5, metadata={"gt": 0})

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

    sigma: float | None = field(default=None, metadata={"gt": 0})
    target_peak_snr: float = field(default=25.0, metadata={"gt": 0})
    poisson: bool = False
    exposure_time: float = field(default=1000.0, metadata={"gt": 0})   # s, for the Poisson term
    bunit: str = "electron/s"


@dataclass
class BrightnessConfig:
    """Network units -> physical: x_phys = scale * x + offset (source surface brightness)."""

    scale: float = field(default=1.0, metadata={"gt": 0})
    offset: float = 0.0


@dataclass
class ObservationConfig:
    """Reading observation files."""

    nan_policy: str = field(default="mask", metadata={"choices": ["mask", "error"]})
    psf_sum_tol: float = field(default=0.01, metadata={"gt": 0})   # |sum(PSF) - 1| allowed


@dataclass
class LensingConfig:
    """The whole ``lensing:`` section."""

    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    lens: LensConfig = field(default_factory=LensConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    brightness: BrightnessConfig = field(default_factory=BrightnessConfig)
    observation: ObservationConfig = field(default_factory=ObservationConfig)
    simulate_seed: int = 1234


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


@dataclass
class PosteriorConfig:
    """Section ``posterior:``: amortized training set-up and sampling defaults for lensing."""

    n_lenses: int = field(default=32, metadata={"min": 1})        # pool of lens operators for training
    n_truths: int = field(default=256, metadata={"min": 1})       # pool of prior-chain truths for training
    n_samples: int = field(default=64, metadata={"min": 2})       # posterior samples per observation
    batch_size: int = field(default=64, metadata={"min": 1})      # sampling batch
    particles: int = field(default=8, metadata={"min": 1})  # per returned sample: prior_is, rtb_amortized_is
    # FPS-SMC (see fps_smc_options): `runs` = one independent run of fps_smc_particles per returned sample
    # (calibrated intervals); `weighted` = one run of n_samples weighted particles per observation
    fps_smc_mode: str = field(default="runs", metadata={"choices": ["runs", "weighted"]})
    fps_smc_particles: int = field(default=2, metadata={"min": 1})  # particles per run, runs mode only
    # grid per tuned method (DPS, DPS+CLA), searched on a separate seed; a method left out uses
    # pipeline.samplers.tuning.DEFAULT_GRIDS
    guidance_scales: dict = field(default_factory=lambda: {"dps": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05],
                                                           "dps_cla": [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]})
    # chi2 calibration (E[chi2] = m for exact posteriors): on lensing the ELBO favours vanishing DPS
    # guidance (each DPS kick costs path KL), which leaves DPS at the prior; see README
    tune_objective: str = field(default="chi2", metadata={"choices": ["chi2", "elbo", "log_r"]})
    tune_seed: int = field(default=987654, metadata={"min": 0})
    seed: int = field(default=0, metadata={"min": 0})
