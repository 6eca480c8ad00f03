"""init_from: a prior converted from a (tiny, random) diffusers PriorTransformer fine-tunes through
train.py: at step 0 it computes what the diffusers model computes, training lowers its loss on new
data, a shape that does not fit fails naming both shapes, and with ckpt_path=last a run that has a
checkpoint resumes it instead of re-initialising."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

diffusers = pytest.importorskip("diffusers")

from conftest import TINY_EMBED_DIM  # noqa: E402
from test_convert_from_diffusers import caption_mask, randomise  # noqa: E402

from unclip.convert.from_diffusers import convert  # noqa: E402
from unclip.training.init_from import init_weights  # noqa: E402
from unclip.training.module import load_module  # noqa: E402
from unclip.training.run import build, initialise, train  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
TOKENS = 16
STEPS = 30


@pytest.fixture
def converted(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)  # the stand-in caption encoder of a conversion without --clip
    theirs = diffusers.PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        embedding_dim=TINY_EMBED_DIM,
        num_embeddings=TOKENS,
    )
    randomise(theirs, seed=11).save_pretrained(tmp_path / "karlo_prior")
    return theirs, convert(tmp_path / "karlo_prior", "prior", tmp_path / "prior.ckpt")


def overrides(shards: Path, runs: Path, ckpt: Path, *extra: str) -> list[str]:
    return [
        "model=prior_diffusion_karlo",
        f"model.embed_dim={TINY_EMBED_DIM}",
        "model.net.width=32",
        "model.net.layers=2",
        "model.net.heads=2",
        "model.text_encoder.mode=own",
        f"model.text_encoder.width={TINY_EMBED_DIM}",
        f"model.text_encoder.context_length={TOKENS}",
        "model.text_encoder.layers=1",
        "model.text_encoder.heads=1",
        "model.text_encoder.clip=null",
        "model.null_condition=learned",
        "model.sampling.steps=4",
        "model.optim.lr=3e-3",
        "model.optim.warmup_steps=0",
        "data=shapes_emb",
        f"data.train_shards={shards}/train-*.tar",
        f"data.val_shards={shards}/train-*.tar",
        "data.batch_size=8",
        "data.val_batch_size=8",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.shuffle_buffer=10",
        "trainer=cpu",
        "logger=none",
        "callbacks=default",
        "callbacks.sample_grid=null",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "callbacks.progress_bar=null",
        f"paths.runs_dir={runs}",
        "run_name=finetune",
        f"init_from={ckpt}",
        *extra,
    ]


def config(args: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=args)


def fixed_loss(module, batch: dict) -> float:
    """The prior's diffusion loss at fixed timesteps and noise over a whole batch."""
    g = torch.Generator().manual_seed(0)
    x0 = module.embedding_norm.normalize(batch["img_emb"])
    t = torch.randint(0, module.diffusion.num_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    tokens = module.tokenize(batch["txt"])
    txt = module.text_condition(batch["txt_emb"])
    with torch.no_grad():
        losses = module.diffusion.training_losses(
            lambda x_t, t_: module.net(x_t, t_, tokens, txt), x0, t, noise
        )
    return float(losses["loss"].mean())


def test_finetuning_a_converted_prior(converted, embedded_shards: Path, tmp_path: Path) -> None:
    theirs, ckpt = converted
    args = overrides(embedded_shards, tmp_path / "runs", ckpt)

    # step 0: the run's network is the diffusers network
    model, datamodule, _ = build(config(args))
    initialise(model, config(args), resuming=False)
    g = torch.Generator().manual_seed(3)
    x_t, txt = (
        torch.randn(3, TINY_EMBED_DIM, generator=g),
        torch.randn(3, TINY_EMBED_DIM, generator=g),
    )
    states = torch.randn(3, TOKENS, TINY_EMBED_DIM, generator=g)
    t, mask = torch.tensor([5, 300, 990]), caption_mask(3, TOKENS)
    with torch.no_grad():
        want = theirs(x_t, t, proj_embedding=txt, encoder_hidden_states=states, attention_mask=mask)
        for net in (model.net, model.eval_net):
            got = net.denoise(x_t, t, net.condition_on_states(states, mask, txt))
            assert (got - want.predicted_image_embedding).abs().max() <= 1e-5
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    before = fixed_loss(model, batch)

    # fine-tuning lowers the loss on the new data, from a fresh step count
    train(config(args))
    last = tmp_path / "runs" / "finetune" / "checkpoints" / "last.ckpt"
    trained = load_module(last)
    assert torch.load(last, weights_only=True)["global_step"] == STEPS
    after = fixed_loss(trained, batch)
    print(f"fine-tuning loss on new data: {before:.3f} -> {after:.3f}")
    assert after < 0.8 * before
    # the standardisation came from the converted checkpoint and was not refitted
    assert torch.equal(trained.embedding_norm.std, model.embedding_norm.std)

    # ckpt_path=last with a checkpoint resumes it (another seed would change re-initialised weights)
    train(config(overrides(embedded_shards, tmp_path / "runs", ckpt, "ckpt_path=last", "seed=1")))
    resumed = load_module(last)
    for key, value in trained.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_init_from_names_both_shapes_and_can_take_raw_weights(converted, tmp_path: Path) -> None:
    _, ckpt = converted
    from unclip.models.diffusion_prior import DiffusionPriorModule

    source = load_module(ckpt)
    hparams = dict(source.hparams)
    wider = DiffusionPriorModule(**{**hparams, "net": {**hparams["net"], "width": 64}})
    with pytest.raises(
        ValueError, match=r"net.query has shape \(32,\) in the checkpoint but \(64,\)"
    ):
        init_weights(wider, ckpt)
    with pytest.raises(FileNotFoundError, match="init_from"):
        init_weights(wider, tmp_path / "nope.ckpt")

    # EMA weights by default, the raw ones on request
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"] = {
        k: v + 1 if k.startswith("ema.module.") and v.is_floating_point() else v
        for k, v in state["state_dict"].items()
    }
    shifted = tmp_path / "shifted.ckpt"
    torch.save(state, shifted)
    same = DiffusionPriorModule(**hparams)
    init_weights(same, shifted)
    assert torch.allclose(same.net.out.bias, source.net.out.bias + 1)
    assert torch.allclose(same.ema.module.out.bias, source.net.out.bias + 1)
    init_weights(same, shifted, use_ema=False)
    assert torch.equal(same.net.out.bias, source.net.out.bias)


def test_init_from_fills_every_stage(tmp_path: Path) -> None:
    """A converted decoder and upsampler initialise fresh modules of their config exactly (the
    prior's case is the fine-tuning test above)."""
    from test_convert_from_diffusers import tiny_decoder, tiny_upsampler

    unet, text_proj = tiny_decoder()
    randomise(unet, seed=21, scale=0.1).save_pretrained(tmp_path / "decoder")
    randomise(text_proj, seed=22, scale=0.1).save_pretrained(tmp_path / "text_proj")
    randomise(tiny_upsampler(), seed=23).save_pretrained(tmp_path / "sr")
    checkpoints = [
        convert(
            tmp_path / "decoder", "decoder", tmp_path / "d.ckpt", text_proj=tmp_path / "text_proj"
        ),
        convert(tmp_path / "sr", "upsampler", tmp_path / "u.ckpt"),
    ]
    for ckpt in checkpoints:
        source = load_module(ckpt)
        torch.manual_seed(99)
        fresh = type(source)(**dict(source.hparams))
        assert any(
            not torch.equal(a, b)
            for a, b in zip(fresh.net.parameters(), source.net.parameters(), strict=True)
        )
        init_weights(fresh, ckpt)
        for module in (fresh.net, fresh.ema.module):
            for (key, want), got in zip(
                source.net.state_dict().items(), module.state_dict().values(), strict=True
            ):
                assert torch.equal(want, got), key
