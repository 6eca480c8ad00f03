"""Train one unclip stage.

python train.py model=clip data=shapes trainer.max_steps=200
python train.py experiment=demo_prior_diffusion ckpt_path=last
python train.py -m model=prior_diffusion,prior_ar data=shapes_emb
"""

import hydra
from omegaconf import DictConfig

from unclip.training.errors import reported_errors
from unclip.training.run import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with reported_errors():  # one line per user error; HYDRA_FULL_ERROR=1: traceback
        metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric") or "", None)


if __name__ == "__main__":
    main()
