# The `user` target: posteriors and plots for the user's own observation FITS files.
# Point `observations:` in the config at a glob, e.g.
#   snakemake --cores 2 user --config observations='data/my_lenses/*.fits'
import glob as _glob


def user_observations():
    pattern = config.get("observations")
    if not pattern:
        return {}
    if not os.path.isabs(pattern) and not _glob.glob(pattern):
        pattern = os.path.join(BASEDIR, pattern)
    files = sorted(_glob.glob(pattern))
    return {os.path.splitext(os.path.basename(f))[0]: os.path.abspath(f) for f in files}


USER_OBS = user_observations()


def user_obs_file(wildcards):
    return USER_OBS[wildcards.obs]


rule user:
    input:
        expand("results/user/{obs}/posterior.fits", obs=sorted(USER_OBS)),


rule sample_user:
    input:
        cfg=CONFIG,
        prior="results/prior/run/final",
        posterior="results/posterior/run/final",
        obs=user_obs_file,
    output:
        fits="results/user/{obs}/posterior.fits",
        png="results/user/{obs}/posterior.png",
    params:
        method=config.get("user_method", "rtb_amortized"),
    log:
        "logs/user/{obs}.log",
    shell:
        "{PY} -m pipeline sample --config {input.cfg} --method {params.method}"
        " --prior {input.prior} --posterior {input.posterior} --obs {input.obs}"
        " --out-file {output.fits} --png {output.png} > {log} 2>&1"
