"""PyTorch VOLO: the published forward, used as the parity reference in eval and training.

The module tree reproduces the release checkpoints' tensor names, so they load with
`strict=True`. In training mode the stem's BatchNorm uses batch statistics, and drop path
and dropout sit where upstream puts them. Token labelling's token mixing and its training
outputs are left out: `train()` returns the same logits as `eval()` would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from volo_convert.architecture.variants import (
    HEAD_OUTPUTS,
    NORM_EPS,
    NUM_CLASS_BLOCKS,
    OUTLOOK_KERNEL,
    PATCH_SIZE,
    STEM_STRIDE,
    TRANSFORMER_STACKS,
    VoloConfig,
    block_drop_path_rate,
    stage_names,
)
from volo_convert.options import (
    DEFAULT_DROP_PATH_RATE,
    DEFAULT_DROP_RATE,
    DEFAULT_HEAD,
    HEADS,
    check_choice,
)

OUTLOOK_PADDING = 1
OUTLOOK_STRIDE = 2


class DropPath(nn.Module):
    """Stochastic depth as timm's: drops whole samples, scales the kept by 1 / (1 - rate)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        keep_prob = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)  # B, 1, ...
        return x * mask / keep_prob


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OutlookAttention(nn.Module):
    """Outlook attention with kernel 3, padding 1, stride 2 on channels-last input."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        kernel_area = OUTLOOK_KERNEL * OUTLOOK_KERNEL
        self.v = nn.Linear(dim, dim, bias=False)
        self.attn = nn.Linear(dim, kernel_area * kernel_area * num_heads)
        self.proj = nn.Linear(dim, dim)
        self.unfold = nn.Unfold(OUTLOOK_KERNEL, padding=OUTLOOK_PADDING, stride=OUTLOOK_STRIDE)
        self.pool = nn.AvgPool2d(OUTLOOK_STRIDE, stride=OUTLOOK_STRIDE, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        kernel_area = OUTLOOK_KERNEL * OUTLOOK_KERNEL
        head_dim = channels // self.num_heads
        out_h, out_w = math.ceil(height / OUTLOOK_STRIDE), math.ceil(width / OUTLOOK_STRIDE)
        num_windows = out_h * out_w

        v = self.v(x).permute(0, 3, 1, 2)  # B, C, H, W
        v = self.unfold(v).reshape(batch, self.num_heads, head_dim, kernel_area, num_windows)
        v = v.permute(0, 1, 4, 3, 2)  # B, heads, N, k*k, C/heads

        attn = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # B, h, w, C
        attn = self.attn(attn).reshape(batch, num_windows, self.num_heads, kernel_area, kernel_area)
        attn = attn.permute(0, 2, 1, 3, 4)  # B, heads, N, k*k, k*k
        attn = (attn * self.scale).softmax(dim=-1)

        x = (attn @ v).permute(0, 1, 4, 3, 2)  # B, heads, C/heads, k*k, N
        x = x.reshape(batch, channels * kernel_area, num_windows)
        x = F.fold(
            x,
            output_size=(height, width),
            kernel_size=OUTLOOK_KERNEL,
            padding=OUTLOOK_PADDING,
            stride=OUTLOOK_STRIDE,
        )  # B, C, H, W
        return self.proj(x.permute(0, 2, 3, 1))


class Outlooker(nn.Module):
    """Stage-1 block: outlook attention and MLP, both pre-norm and residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = OutlookAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W tokens of a B, H, W, C input."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).reshape(
            batch, height * width, 3, self.num_heads, channels // self.num_heads
        )
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, heads, N, C/heads
        attn = ((query @ key.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ value).transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj(x)


class Transformer(nn.Module):
    """Stage-2..4 block: self-attention and MLP, both pre-norm and residual, with drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClassAttention(nn.Module):
    """CaiT class attention: the class token queries all tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.kv = nn.Linear(dim, dim * 2, bias=False)
        self.q = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, channels = x.shape
        kv = self.kv(x).reshape(batch, num_tokens, 2, self.num_heads, self.head_dim)
        key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, heads, N, C/heads
        query = self.q(x[:, :1]).reshape(batch, self.num_heads, 1, self.head_dim)
        attn = ((query * self.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
        cls_embed = (attn @ value).transpose(1, 2).reshape(batch, 1, channels)
        return self.proj(cls_embed)


class ClassBlock(nn.Module):
    """Class-attention block: updates the class token, passes the others through."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_embed = x[:, :1] + self.attn(self.norm1(x))
        cls_embed = cls_embed + self.mlp(self.norm2(cls_embed))
        return torch.cat([cls_embed, x[:, 1:]], dim=1)


class PatchEmbed(nn.Module):
    """Three-conv stem (stride 2) and the patch projection (stride 4)."""

    def __init__(self, hidden_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, hidden_dim, 7, stride=STEM_STRIDE, padding=3, bias=False),
            nn.BatchNorm2d(hidden_dim, eps=NORM_EPS),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim, eps=NORM_EPS),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim, eps=NORM_EPS),
            nn.ReLU(inplace=True),
        )
        patch_stride = PATCH_SIZE // STEM_STRIDE
        self.proj = nn.Conv2d(hidden_dim, embed_dim, patch_stride, stride=patch_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x))  # B, C, H, W


class Downsample(nn.Module):
    """2x2 stride-2 conv between stage 1 and stage 2, channels-last in and out."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # B, H/2, W/2, C


class Volo(nn.Module):
    """VOLO classifier; `forward` returns the output of `head`.

    `full` gives the published eval logits (aux head included), `cls` the class head's
    logits alone, `features` the normalised class token. Every head keeps all modules,
    so release checkpoints load with `strict=True` whichever is chosen. `drop_path_rate`
    and `drop_rate` act in training mode only, where upstream applies them.
    """

    def __init__(
        self,
        config: VoloConfig,
        image_size: int,
        head: str = DEFAULT_HEAD,
        drop_path_rate: float = DEFAULT_DROP_PATH_RATE,
        drop_rate: float = DEFAULT_DROP_RATE,
    ) -> None:
        super().__init__()
        check_choice("head", head, HEADS, ValueError)
        self.head_type = head
        dims, heads, mlp_ratio = config.embed_dims, config.num_heads, config.mlp_ratio
        self.patch_embed = PatchEmbed(config.stem_hidden_dim, dims[0])
        grid = image_size // (PATCH_SIZE * 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dims[-1]))
        self.pos_drop = nn.Dropout(drop_rate)
        outlookers = [Outlooker(dims[0], heads[0], mlp_ratio) for _ in range(config.layers[0])]
        network: list[nn.Module] = [nn.Sequential(*outlookers), Downsample(dims[0], dims[1])]
        for stage in TRANSFORMER_STACKS:
            blocks = [
                Transformer(
                    dims[stage],
                    heads[stage],
                    mlp_ratio,
                    block_drop_path_rate(config, stage, block, drop_path_rate),
                )
                for block in range(config.layers[stage])
            ]
            network.append(nn.Sequential(*blocks))
        self.network = nn.ModuleList(network)
        self.post_network = nn.ModuleList(
            [ClassBlock(dims[-1], heads[-1], mlp_ratio) for _ in range(NUM_CLASS_BLOCKS)]
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[-1]))
        self.aux_head = nn.Linear(dims[-1], config.num_classes)
        self.norm = nn.LayerNorm(dims[-1], eps=NORM_EPS)
        self.head = nn.Linear(dims[-1], config.num_classes)

    def stage_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Runs the forward and returns every stage's output, in order.

        Args:
            images: B, 3, S, S normalised images.

        Returns:
            stage name -> output, in the order of `stage_names(head)`; the last is
            `logits`, or `features` for head `features`.
        """
        outputs: dict[str, torch.Tensor] = {}
        x = self.patch_embed(images).permute(0, 2, 3, 1)  # B, H, W, C
        outputs["stem"] = x
        x = outputs["stack0"] = self.network[0](x)
        x = outputs["downsample"] = self.network[1](x) + self.pos_embed
        x = self.pos_drop(x)
        for stack_index in TRANSFORMER_STACKS:
            x = outputs[f"stack{stack_index}"] = self.network[stack_index + 1](x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # B, N, C
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # B, 1+N, C
        for block_index, block in enumerate(self.post_network):
            x = outputs[f"classifier{block_index}"] = block(x)
        x = outputs["norm"] = self.norm(x)
        if self.head_type == "features":
            outputs["features"] = x[:, 0]  # B, C
        else:
            logits = self.head(x[:, 0])  # B, K
            if self.head_type == "full":
                logits = logits + 0.5 * self.aux_head(x[:, 1:]).max(dim=1).values
            outputs["logits"] = logits
        return {stage: outputs[stage] for stage in stage_names(self.head_type)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stage_outputs(images)[HEAD_OUTPUTS[self.head_type]]


def parameter_shapes(config: VoloConfig, image_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint that fits `config` at `image_size`, with its shape.

    The model is built on the meta device: no memory is allocated, nothing is computed.
    """
    with torch.device("meta"):
        model = Volo(config, image_size)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
