"""The CLIP stage: contrastive training of any open_clip architecture.

The rest of the stack embeds images and captions with the CLIP trained here and freezes it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import gather_features

from unclip.clip import clip_pixels, register_arch
from unclip.clip.factory import quiet_random_init
from unclip.evaluation.zero_shot import (
    attribute_accuracy,
    predict_attributes,
    single_object_truth,
)
from unclip.models.hard_negatives import hard_negative
from unclip.training.module import UnclipModule


@dataclass
class ClipConfig:
    """The CLIP stage's top-level `model.<key>` settings; conf/model/clip.yaml sets them."""

    # any of open_clip.list_models(), or one of conf/clip_arch/*.json
    model_name: str
    # an open_clip pretrained tag or a local weights file to start from (None: random init)
    pretrained: str | None = None
    name: str = "clip"
    # CLIP's temperature is clamped to this (as in open_clip's trainer)
    max_logit_scale: float = 100.0
    # word groups ({name: [words]}) whose words are swapped between a caption's objects to make
    # one hard negative caption per sample (NegCLIP; unclip.models.hard_negatives); None: only
    # in-batch negatives, as in CLIP
    hard_negative_groups: dict[str, list[str]] | None = None


class ClipModule(UnclipModule):
    """`settings`: ClipConfig's keys. arch: an open_clip architecture registered under
    `model_name` (kept in the checkpoint); zero_shot: `{template, attributes}` or None."""

    data_fields = ["image", "txt", "json"]
    settings_config = ClipConfig

    def __init__(
        self,
        arch: dict | None = None,
        zero_shot: dict | None = None,
        optim: dict | None = None,
        ema: dict | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(optim, ema)
        config = self.build_settings(settings)
        model_name = config.model_name
        if arch is not None:
            register_arch(model_name, arch)
        elif model_name in open_clip.list_models():
            arch = open_clip.get_model_config(model_name)
        # the architecture stays in the checkpoint so it loads where the config file is absent
        self.save_settings(config)
        self.name = config.name
        with quiet_random_init():  # from scratch, or weights loaded from a checkpoint next
            self.net = open_clip.create_model(model_name, pretrained=config.pretrained)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.output_dim = int(self.net.text_projection.shape[-1])
        self.max_logit_scale = config.max_logit_scale
        self.hard_negative_groups = config.hard_negative_groups
        self.zero_shot = zero_shot
        self.init_ema()

    @property
    def clip(self) -> torch.nn.Module:
        return self.eval_net

    def setup(self, stage: str) -> None:
        # rank and world size are known only once the trainer has launched its processes
        self.loss_fn = open_clip.ClipLoss(
            local_loss=True,
            gather_with_grad=True,
            rank=self.global_rank,
            world_size=self.trainer.world_size if self._trainer else 1,
        )

    def _text(self, net: torch.nn.Module, captions: list[str]) -> torch.Tensor:
        return F.normalize(net.encode_text(self.tokenizer(captions).to(self.device)), dim=-1)

    def _features(self, net: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(net.encode_image(clip_pixels(batch["image"], net)), dim=-1)
        return image, self._text(net, batch["txt"])

    def _negatives(
        self, net: torch.nn.Module, captions: list[str], seed: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One hard negative caption per sample, encoded, and which samples have one."""
        assert self.hard_negative_groups is not None
        rng = random.Random(seed)
        negatives = [hard_negative(c, self.hard_negative_groups, rng) for c in captions]
        valid = torch.tensor([n is not None for n in negatives], device=self.device)
        return self._text(net, [n or "" for n in negatives]), valid

    def _loss_with_negatives(
        self, image: torch.Tensor, text: torch.Tensor, negative: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """NegCLIP's loss: each image picks its caption among all captions and all valid hard
        negatives; each caption picks its image among the images, as in CLIP. Gathered across
        ranks like open_clip's ClipLoss (local loss, gradients through the gather)."""
        world_size, rank = self.loss_fn.world_size, self.loss_fn.rank
        all_image, all_text, all_negative, all_valid = image, text, negative, valid
        if world_size > 1:
            gather = dict(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
            all_image, all_text = gather_features(image, text, **gather)
            all_negative, flags = gather_features(negative, valid[:, None].float(), **gather)
            all_valid = flags[:, 0] > 0.5
        scale = self.net.logit_scale.exp()
        candidates = torch.cat([all_text, all_negative[all_valid]])
        labels = torch.arange(image.shape[0], device=self.device) + rank * image.shape[0]
        per_image = F.cross_entropy(scale * image @ candidates.T, labels)
        per_text = F.cross_entropy(scale * text @ all_image.T, labels)
        return (per_image + per_text) / 2

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, text = self._features(self.net, batch)
        if self.hard_negative_groups:
            seed = f"{self.global_step}/{self.global_rank}"
            negative, valid = self._negatives(self.net, batch["txt"], seed)
            loss = self._loss_with_negatives(image, text, negative, valid)
            self.log("train/hard_negative_acc", _prefers_caption(image, text, negative, valid))
        else:
            loss = self.loss_fn(image, text, self.net.logit_scale.exp())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", self.net.logit_scale.exp())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # CLIP's temperature is clamped so the logits cannot blow up (as in open_clip's trainer)
        with torch.no_grad():
            self.net.logit_scale.clamp_(0, torch.log(torch.tensor(self.max_logit_scale)).item())
        super().on_train_batch_end(outputs, batch, batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        net = self.eval_net
        image, text = self._features(net, batch)
        size = image.shape[0]
        logits = net.logit_scale.exp() * image @ text.T
        labels = torch.arange(size, device=self.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        self.log("val/loss", loss, batch_size=size, sync_dist=True, prog_bar=True)
        retrieval = (logits.argmax(dim=-1) == labels).float().mean()
        self.log("val/retrieval_acc", retrieval, batch_size=size, sync_dist=True)
        if self.zero_shot and "json" in batch:
            self._log_zero_shot(net, image, batch["json"])
        if self.hard_negative_groups:
            negative, valid = self._negatives(net, batch["txt"], f"val/{batch_idx}")
            if valid.any():
                self.log(
                    "val/hard_negative_acc",
                    _prefers_caption(image, text, negative, valid),
                    batch_size=int(valid.sum()),
                    sync_dist=True,
                )

    def _log_zero_shot(self, net: torch.nn.Module, image: torch.Tensor, metadata: list) -> None:
        attributes = self.zero_shot["attributes"]
        truth = single_object_truth(metadata, list(attributes))
        predicted = predict_attributes(
            image, net, self.tokenizer, self.zero_shot["template"], attributes
        )
        for name, (correct, counted) in attribute_accuracy(predicted, truth).items():
            if counted:
                self.log(
                    f"val/zero_shot_{name}_acc",
                    correct / counted,
                    batch_size=counted,
                    sync_dist=True,
                )


def _prefers_caption(
    image: torch.Tensor, text: torch.Tensor, negative: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """How often an image is closer to its caption than to that caption's hard negative (the
    binding test of ARO / NegCLIP): 0.5 is a bag of words."""
    wins = (image * text).sum(-1) > (image * negative).sum(-1)
    return wins[valid].float().mean()
