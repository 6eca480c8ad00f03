"""Sample from trained unclip checkpoints: text -> image, or one of the paper's manipulations.

python sample.py captions='["a red circle","a blue star"]' samples_per_caption=8
python sample.py mode=interpolate 'images=[a.png,b.png]'
python sample.py mode=text_diff 'images=[a.png]' text_diff.caption="a red circle" \
    text_diff.target="a blue circle"

See conf/sample.yaml for every setting.
"""

import hydra
from omegaconf import DictConfig

from unclip.sampling.run import sample
from unclip.training.errors import reported_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    with reported_errors():  # one line per user error; HYDRA_FULL_ERROR=1: traceback
        sample(cfg)


if __name__ == "__main__":
    main()
