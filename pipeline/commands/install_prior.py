"""``python -m pipeline install-prior``: use a shipped, pipeline-trained prior instead of training one.

Training the default prior takes longer than the 20-minute CPU demo allows, so a checkpoint made by
``train-prior`` on this very config ships under ``data/pretrained/`` (``data/pretrained/README.md`` gives
the command).
This command checks that the checkpoint loads (checksums), that it was trained with the same
``prior:`` recipe as the config (the result hash), then installs it as ``RUN_DIR/final`` - the same
layout ``train-prior`` produces - so the rest of the DAG cannot tell the difference. Set
``prior_checkpoint: null`` in the config to train from scratch instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.errors import ConfigError, InputFileError


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="shipped prior checkpoint directory")
    parser.add_argument("--config", required=True, metavar="FILE", help="pipeline YAML config (section prior:)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory; the prior goes to RUN_DIR/final")


def run(args) -> int:
    from pipeline.config import load_section
    from pipeline.diffusion.prior_config import PriorConfig
    from pipeline.io.atomic import atomic_directory, write_text
    from pipeline.diffusion.network_prior import load_prior

    src = Path(args.checkpoint)
    prior = load_prior(src)  # validates manifest checksums and rebuilds the network
    cfg = load_section(args.config, "prior", PriorConfig)
    meta = prior.meta
    if meta.get("config_hash") != cfg.result_hash():
        raise ConfigError(args.config, "prior", f"the shipped prior {src} was trained with another prior: recipe "
                          f"(hash {meta.get('config_hash')} != {cfg.result_hash()}); set prior_checkpoint: null "
                          "to train one")
    if not (src / "hparams.json").is_file():
        raise InputFileError(src, "not an exported prior directory (no hparams.json)")
    out = Path(args.out)
    with atomic_directory(out / "final") as tmp:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    write_text(out / "done", json.dumps({"installed_from": str(src), "step": meta.get("step")}) + "\n")
    print(json.dumps({"installed": str(out / "final"), "from": str(src), "step": meta.get("step")}))
    return 0
