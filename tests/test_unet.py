"""The ADM/GLIDE UNet: shapes, conditioning paths, context masking, and that it can learn."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from unclip.nn.unet import AttentionBlock, ResBlock, UNet, timestep_embedding

TINY = dict(
    model_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_head_channels=8,
    image_size=8,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomise_zero_layers(net: torch.nn.Module) -> None:
    """Fresh output convolutions are zero (the network predicts 0): perturb every parameter so
    the conditioning paths are visible in the output."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def test_output_shape_and_zero_initial_prediction() -> None:
    torch.manual_seed(0)
    net = UNet(in_channels=3, out_channels=6, **TINY)
    y = net(torch.randn(2, 3, 8, 8), torch.tensor([0, 999]))
    assert y.shape == (2, 6, 8, 8)
    assert torch.count_nonzero(y) == 0  # zero-initialised output layer
    assert net.time_embed_dim == 4 * TINY["model_channels"]


def test_fully_convolutional_net_takes_other_sizes_but_refuses_indivisible_ones() -> None:
    net = UNet(**{**TINY, "attention_resolutions": (), "channel_mult": (1, 2, 2)})
    for side in (8, 12, 20):
        assert net(torch.randn(1, 3, side, side), torch.tensor([5])).shape == (1, 3, side, side)
    assert not any(isinstance(m, AttentionBlock) for m in net.modules())
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 10, 10), torch.tensor([5]))


def test_attention_is_placed_at_the_configured_resolutions_and_middle() -> None:
    net = UNet(**{**TINY, "channel_mult": (1, 2, 2), "attention_resolutions": (4,)})
    # 8px: no attention; 4px: after each res block down (1) and up (2); 2px: middle block only
    assert sum(isinstance(m, AttentionBlock) for m in net.modules()) == 1 + 2 + 1
    with pytest.raises(ValueError, match=r"attention_resolutions \[3\]"):
        UNet(**{**TINY, "attention_resolutions": (3,)})
    with pytest.raises(ValueError, match="num_head_channels"):
        UNet(**{**TINY, "num_head_channels": 5})


def test_cond_and_context_change_the_output_and_masked_tokens_do_not() -> None:
    torch.manual_seed(0)
    net = UNet(**TINY, cond_dim=5, context_dim=7).eval()
    _randomise_zero_layers(net)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    cond, context = torch.randn(2, 5), torch.randn(2, 3, 7)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    base = net(x, t, cond, context, mask)
    assert not torch.allclose(base, net(x, t, torch.randn(2, 5), context, mask))
    changed_real = context.clone()
    changed_real[:, 0] += 1
    assert not torch.allclose(base, net(x, t, cond, changed_real, mask))
    changed_padding = context.clone()
    changed_padding[:, 2] += 100
    torch.testing.assert_close(base, net(x, t, cond, changed_padding, mask))
    # without a mask every token counts
    assert not torch.allclose(net(x, t, cond, context), net(x, t, cond, changed_padding))
    with pytest.raises(ValueError, match="needs cond"):
        net(x, t)


def test_unconditioned_net_refuses_cond_and_context() -> None:
    net = UNet(**TINY)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([1])
    with pytest.raises(ValueError, match="cond_dim=None"):
        net(x, t, cond=torch.randn(1, 4))
    with pytest.raises(ValueError, match="context_dim=None"):
        net(x, t, context=torch.randn(1, 2, 4))


def test_resblock_resamples_and_timestep_embedding_is_sinusoidal() -> None:
    block = ResBlock(8, 16, out_channels=12, down=True)
    assert block(torch.randn(2, 8, 8, 8), torch.randn(2, 16)).shape == (2, 12, 4, 4)
    block = ResBlock(8, 16, up=True, use_scale_shift_norm=False)
    assert block(torch.randn(2, 8, 4, 4), torch.randn(2, 16)).shape == (2, 8, 8, 8)
    emb = timestep_embedding(torch.tensor([0, 3]), 6)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert emb.shape == (2, 6)


def test_tiny_unet_learns_to_denoise_conditioned_on_cond() -> None:
    """Predict the clean image (one of two colours, chosen by `cond`) from a noisy one: the loss
    must fall well below that of predicting the mean colour."""
    torch.manual_seed(0)
    net = UNet(**TINY, cond_dim=2, context_dim=4)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])
    losses = []
    for _ in range(60):
        label = torch.randint(0, 2, (16,))
        x0 = colours[label][:, :, None, None].expand(-1, -1, 8, 8)
        x_t = x0 + 2.0 * torch.randn_like(x0)
        cond = F.one_hot(label, 2).float()
        context = torch.randn(16, 2, 4)
        loss = F.mse_loss(net(x_t, torch.full((16,), 500), cond, context), x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # predicting the mean of the two colours scores 2/3; the label makes it learnable
    assert sum(losses[-10:]) / 10 < 0.1


def test_coordinate_channels_give_each_pixel_its_position() -> None:
    from unclip.nn.unet import with_coordinates

    blank = torch.zeros(2, 3, 8, 8)
    grid = with_coordinates(blank)[:, 3:]
    assert grid.shape == (2, 2, 8, 8)
    torch.testing.assert_close(grid[1, 0, 5], torch.linspace(-1, 1, 8))  # x along the width
    torch.testing.assert_close(grid[1, 1, :, 2], torch.linspace(-1, 1, 8))  # y down the height
    net = UNet(
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        coordinate_channels=True,
        image_size=8,
    )
    first = net.input_blocks[0][0]
    assert first.in_channels == 5
    features = first(with_coordinates(blank))
    # on a blank image only the coordinates tell a left pixel from a right one
    assert (features[0, :, 4, 1] - features[0, :, 4, 6]).abs().max() > 1e-3
    out = net(blank, torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 3, 8, 8)


def test_attention_position_tells_pixels_apart_and_starts_as_the_plain_block() -> None:
    from unclip.nn.unet import AttentionBlock, position_code

    code = position_code(4, 6)
    assert code.shape == (32, 24)
    assert torch.unique(code, dim=1).shape[1] == 24  # every pixel its own code
    torch.testing.assert_close(position_code(4, 6), code)  # a function of the grid alone
    plain = AttentionBlock(16, 8)
    placed = AttentionBlock(16, 8, position=True)
    placed.load_state_dict(plain.state_dict(), strict=False)
    torch.nn.init.normal_(plain.proj_out.weight)
    placed.proj_out.load_state_dict(plain.proj_out.state_dict())
    flat = torch.ones(2, 16, 4, 6) + 0.1 * torch.randn(2, 16, 1, 1)
    # zero-initialised projection: a fresh block is the block without positions
    torch.testing.assert_close(placed(flat), plain(flat))
    assert (plain(flat) - plain(flat)[..., :1, :1]).abs().max() < 1e-4  # no position: uniform
    torch.nn.init.normal_(placed.position_proj.weight)
    out = placed(flat)
    assert (out[..., 0, 0] - out[..., 3, 5]).abs().max() > 1e-2  # corners now differ
    net = UNet(
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        attention_position=True,
        image_size=8,
    )
    assert sum(isinstance(m, AttentionBlock) and m.position_proj is not None for m in net.modules())
    assert net(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)).shape == (2, 3, 8, 8)


def test_context_attention_reads_the_tokens_pixel_by_pixel() -> None:
    """A context-only block (context_resolutions) lets each pixel read the tokens and nothing of
    the other pixels: change one pixel and only its own output moves; change the tokens and all do."""
    from unclip.nn.unet import AttentionBlock

    block = AttentionBlock(16, 32, context_dim=8, position=True, self_attention=False)
    torch.nn.init.normal_(block.proj_out.weight)
    x, tokens = torch.randn(1, 16, 4, 4), torch.randn(1, 3, 8)
    moved = x.clone()
    moved[..., 1, 2] += 1.0
    # GroupNorm mixes pixels through its statistics: compare outputs past the shared norm
    delta = block(moved, tokens) - block(x, tokens)
    delta[..., 1, 2] -= 1.0  # the residual path carries the change itself
    others = delta.clone()
    others[..., 1, 2] = 0
    # the only coupling left is the norm's mean and variance, far below a pixel's own change
    assert (
        others.abs().max() < 0.2 * (block(moved, tokens) - block(x, tokens))[..., 1, 2].abs().max()
    )
    assert (block(x, torch.randn(1, 3, 8)) - block(x, tokens)).abs().amin() > 0
    with pytest.raises(ValueError, match="context tokens only"):
        block(x)
    net = UNet(
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        context_resolutions=(8,),
        image_size=8,
        context_dim=8,
    )
    kinds = [m.self_attention for m in net.modules() if isinstance(m, AttentionBlock)]
    assert kinds.count(False) == 3 and kinds.count(True) >= 1  # 8 px: 1 down + 2 up blocks
    out = net(
        torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), context=torch.randn(2, 3, 8)
    )
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="context_resolutions \\[5\\]"):
        UNet(
            model_channels=16,
            channel_mult=(1, 2),
            attention_resolutions=(),
            context_resolutions=(5,),
            image_size=8,
            context_dim=8,
        )


def _attention_by_definition(
    block: AttentionBlock, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GLIDE's attention written out: per head, softmax(q k^T / sqrt(d)) v over the context
    tokens (padding hidden) followed by the pixels' own keys, then the output projection."""
    batch, channels, height, width = x.shape
    h = block.norm(x).reshape(batch, channels, -1)
    if block.position_proj is not None:
        from unclip.nn.unet import position_code

        h = h + block.position_proj(position_code(height, width)[None])
    parts = block.qkv(h).chunk(3 if block.self_attention else 1, dim=1)
    context_k, context_v = block.context_kv(context).transpose(1, 2).chunk(2, dim=1)
    q = parts[0]
    k = torch.cat([context_k, *parts[1:2]], dim=2)
    v = torch.cat([context_v, *parts[2:3]], dim=2)
    keep = torch.cat([mask, mask.new_ones(batch, k.shape[2] - mask.shape[1])], dim=1)
    d = channels // block.heads
    out = []
    for head in range(block.heads):
        rows = slice(head * d, (head + 1) * d)
        scores = torch.einsum("bcl,bcn->bln", q[:, rows], k[:, rows]) / d**0.5
        weights = scores.masked_fill(~keep[:, None, :], float("-inf")).softmax(dim=-1)
        out.append(torch.einsum("bln,bcn->bcl", weights, v[:, rows]))
    return x + block.proj_out(torch.cat(out, dim=1)).reshape(x.shape)


@pytest.mark.parametrize("self_attention", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_block_computes_glides_attention_in_either_memory_format(
    self_attention: bool, memory_format: torch.memory_format
) -> None:
    """The block runs its 1x1 projections as matrix products on the pixels as tokens (a view of
    a channels_last map): the result is the attention of the definition, padding hidden, and
    keeps the input's memory format."""
    torch.manual_seed(0)
    block = AttentionBlock(32, 16, context_dim=8, position=True, self_attention=self_attention)
    _randomise_zero_layers(block)
    x = torch.randn(3, 32, 4, 4).contiguous(memory_format=memory_format)
    context, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    out = block(x, context, mask)
    torch.testing.assert_close(out, _attention_by_definition(block, x, context, mask))
    assert out.is_contiguous(memory_format=memory_format)
    padded = context.clone()
    padded[1, 2:] += 10.0  # hidden tokens change nothing
    torch.testing.assert_close(block(x, padded, mask), out)
