"""Token encoders: conditions other than text made into a cross-attention context (the lecture's "CA" rows for
class labels and layouts), and task models stored as the weights they changed over a text UNet.

A token encoder is a diffusers ``ModelMixin`` saved in a folder named for its kind (:data:`TOKEN_ENCODERS`:
``class_embedder``, ``layout_embedder``) beside the UNet; its output replaces the text encoder's states
(:class:`lab.conditioning.ClassTokens`, :class:`lab.conditioning.Layout`). A task model that changed only part
of the text UNet ships that part as :data:`PARTIAL_FILE` under the UNet's own parameter names
(``load_state_dict(strict=False)`` in plain diffusers; :func:`load_partial`). The shapes world's models and
their training are :mod:`lab.shapes.tasks`.
"""
from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

PARTIAL_FILE = "unet_partial.safetensors"  # unet-TASK/: the UNet weights a fine-tune changed, by the UNet's names
LORA_FILE = "pytorch_lora_weights.safetensors"  # unet-TASK/: a LoRA adapter over the base UNet (diffusers' name)
# unet-TASK/: {"base": the UNet folder the weights go over ("unet" when absent), "base_digest": weights_digest of the
# base the adapter was trained over, or last measured over when that base was retrained (the loader warns on another)}
ADAPTER_FILE = "lab_adapter.json"


def weights_digest(folder) -> str:
    """A short SHA-256 of a model folder's weights by value (every ``*.safetensors`` tensor, by name, as fp16):
    the same for an fp32 training copy and its fp16 export, different for any retrained weight."""
    import hashlib
    from pathlib import Path

    from safetensors import safe_open
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in sorted(st.keys()):
                h.update(k.encode())
                h.update(st.get_tensor(k).to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_adapter_record(folder, base: str, base_dir=None) -> None:
    """``folder / ADAPTER_FILE``: the UNet folder (``base``) the weights in ``folder`` go over, and the
    :func:`weights_digest` of ``base_dir``, the copy of it they were trained over (none without ``base_dir``)."""
    import json
    from pathlib import Path
    record = {"base": base, **({"base_digest": weights_digest(base_dir)} if base_dir is not None else {})}
    (Path(folder) / ADAPTER_FILE).write_text(json.dumps(record) + "\n")


def _states(text_encoder, tokenizer, texts) -> torch.Tensor:
    n = tokenizer.model_max_length
    ids = tokenizer(list(texts), padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state.float().cpu()


def _phrase_states(text_encoder, tokenizer, prefix: str, phrases) -> torch.Tensor:
    """Each phrase's mean text state, read in a caption's place (``"{prefix} {phrase}"``): ``[len(phrases), dim]``."""
    start = 1 + len(tokenizer(prefix, add_special_tokens=False).input_ids)
    states = _states(text_encoder, tokenizer, [f"{prefix} {p}" for p in phrases])
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in phrases]
    return torch.stack([s[start:start + k].mean(0) for s, k in zip(states, lengths)])


class ClassTokenEncoder(ModelMixin, ConfigMixin):
    """Class labels -> a cross-attention context (LDM's ``ClassEmbedder``: a learned token per class, the seed's
    CA row for class labels), ``[B, length, dim]``: a learned frame of ``length`` tokens with the class's token at
    ``slot``. The frame starts as the text encoder's states of the empty caption (or of one-phrase captions:
    :meth:`from_text_encoder`) and each class token as the mean state of its words ("large red circle"), so
    fine-tuning starts from the text model reading a one-phrase caption; the null class (index ``num_classes``,
    for guidance) starts as the empty caption's own state there.
    A frame rather than one token: with a single key, cross-attention's softmax is 1 everywhere and the class can
    only shift every pixel alike; beside the frame's tokens its map shows where the class is read.
    ``class_names``: what each index draws (``"large red circle"``)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_classes: int = 36, dim: int = 128, length: int = 32, slot: int = 1,
                 class_names: tuple = ()):
        super().__init__()
        self.table = torch.nn.Embedding(num_classes + 1, dim)  # the last row: the null class
        self.frame = torch.nn.Parameter(torch.zeros(length, dim))

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        s = self.config.slot
        frame = self.frame.expand(len(labels), -1, -1)
        return torch.cat([frame[:, :s], self.table(labels)[:, None], frame[:, s + 1:]], 1)

    @classmethod
    @torch.no_grad()
    def from_text_encoder(cls, text_encoder, tokenizer, class_names, *, slot: int = 1,
                          frame: str = "empty") -> "ClassTokenEncoder":
        """Started from the text encoder (class docstring): ``class_names`` are phrases (``"large red circle"``).
        ``frame="phrases"``: the frame starts instead as the mean over the classes of the states of their
        one-phrase captions (``"a large red circle"``): what a causal text encoder's later positions say about
        any one-object caption, where the empty caption's say "anything" (the text model then draws one object or
        two)."""
        if frame not in ("empty", "phrases"):
            raise ValueError(f"unknown frame init {frame!r}; expected 'empty' or 'phrases'")
        n = tokenizer.model_max_length
        enc = cls(len(class_names), text_encoder.config.hidden_size, n, slot, list(class_names))
        empty = _states(text_encoder, tokenizer, [""])[0]
        enc.frame.copy_(empty if frame == "empty" else
                        _states(text_encoder, tokenizer, [f"a {c}" for c in class_names]).mean(0))
        enc.table.weight[:-1].copy_(_phrase_states(text_encoder, tokenizer, "a", class_names))
        enc.table.weight[-1].copy_(empty[slot])
        return enc


class LayoutTokenEncoder(ModelMixin, ConfigMixin):
    """Boxes with labels -> a cross-attention context (LDM's layout-to-image: box tokens read by cross-attention;
    GLIGEN's grounding token): each box's token is its label's embedding plus an MLP of the box's Fourier features
    (``x0, y0, x1, y1`` over the image size, ``frequencies`` octaves), at slots ``1 .. max_objects`` of a learned
    frame of ``length`` tokens; a slot without a box keeps the frame's token, so no boxes at all is the null
    layout (guidance). The frame and the label embeddings start from the text encoder (the empty caption, the
    words "red circle"), the MLP's last layer at zero: at the start a box token is its label read as a caption's
    words, and training teaches it where. ``coordinates``: the model's UNet also takes the latent grid's x and y
    as two concatenated input channels (:func:`coordinate_channels`), so its queries know where they are."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, label_names: tuple = (), dim: int = 128, length: int = 32, max_objects: int = 2,
                 frequencies: int = 8, image_size: int = 64, coordinates: bool = False):
        super().__init__()
        self.labels = torch.nn.Embedding(len(label_names), dim)
        self.box = torch.nn.Sequential(torch.nn.Linear(8 * frequencies, 2 * dim), torch.nn.SiLU(),
                                       torch.nn.Linear(2 * dim, dim))
        self.frame = torch.nn.Parameter(torch.zeros(length, dim))

    def fourier(self, boxes: torch.Tensor) -> torch.Tensor:
        x = boxes.float() / self.config.image_size  # [..., 4] in [0, 1]
        freqs = 2.0 ** torch.arange(self.config.frequencies, device=x.device) * torch.pi
        ang = x[..., None] * freqs  # [..., 4, F]
        return torch.cat([ang.sin(), ang.cos()], -1).flatten(-2)

    def forward(self, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``boxes`` ``[B, K, 4]`` pixels ``(x0, y0, x1, y1)``, ``labels`` ``[B, K]`` (``-1``: no box) ->
        ``[B, length, dim]``."""
        k = labels.shape[1]
        tok = self.labels(labels.clamp(min=0)) + self.box(self.fourier(boxes)).to(self.frame.dtype)
        frame = self.frame.expand(len(labels), -1, -1)
        tok = torch.where((labels >= 0)[..., None], tok, frame[:, 1:1 + k])
        return torch.cat([frame[:, :1], tok, frame[:, 1 + k:]], 1)

    @classmethod
    @torch.no_grad()
    def from_text_encoder(cls, text_encoder, tokenizer, label_names, *, max_objects: int = 2,
                          image_size: int = 64, coordinates: bool = False) -> "LayoutTokenEncoder":
        """Started from the text encoder (class docstring): ``label_names`` are phrases (``"red circle"``)."""
        n = tokenizer.model_max_length
        enc = cls(list(label_names), text_encoder.config.hidden_size, n, max_objects, 8, image_size, coordinates)
        enc.frame.copy_(_states(text_encoder, tokenizer, [""])[0])
        enc.labels.weight.copy_(_phrase_states(text_encoder, tokenizer, "a small", label_names))
        torch.nn.init.zeros_(enc.box[2].weight)
        torch.nn.init.zeros_(enc.box[2].bias)
        return enc


class CameraTokenEncoder(ModelMixin, ConfigMixin):
    """A relative camera -> one more cross-attention token after the context (Zero-1-to-3's conditioning: its
    ``cc_projection``, a linear map of the input image's CLIP embedding concatenated with the camera, started
    as the identity on the embedding and zero on the camera). Ours reads the mean of the context it is appended
    to (the caption's states: what our model has of "the image's embedding") beside the camera's ``features``
    numbers (:data:`lab.shapes.views.CAMERA_FEATURES`): ``token = W [mean(context); camera] + b``, ``W`` started
    as ``[I | 0]``. The null camera (guidance: both conditions dropped) is all zeros, which no real change is
    (its roll cosine would be 0 with sine 0). ``coordinates``: the model's UNet also takes the latent grid's x and
    y as two more input channels (:func:`coordinate_channels`), after the input view's."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, dim: int = 128, features: int = 5, feature_names: tuple = (), coordinates: bool = False):
        super().__init__()
        self.proj = torch.nn.Linear(dim + features, dim)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :dim].copy_(torch.eye(dim))
            self.proj.bias.zero_()

    def token(self, context: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """``context`` ``[B, L, dim]``, ``camera`` ``[B, features]`` -> the camera token ``[B, dim]``."""
        return self.proj(torch.cat([context.mean(1), camera.to(context.dtype)], -1))

    def forward(self, context: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """``[B, L, dim]`` and ``[B, features]`` -> ``[B, L + 1, dim]``: the context, then the camera token."""
        return torch.cat([context, self.token(context, camera)[:, None]], 1)


TOKEN_ENCODERS = {"class_embedder": ClassTokenEncoder, "layout_embedder": LayoutTokenEncoder,
                  "camera_embedder": CameraTokenEncoder}  # by folder name


COORD_CHANNELS = 2  # x and y


def coordinate_channels(n: int, height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[n, 2, height, width]``: each latent position's x and y (its cell's centre, -1 .. 1 left to right and
    top to bottom), channels a UNet can take beside its latents so its features know where they are
    (CoordConv, Liu et al. 2018)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 - 1
    grid = torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)])
    return grid.to(dtype)[None].expand(n, -1, -1, -1)


def load_partial(unet, path) -> None:
    """Put a CA task model's weights (:data:`PARTIAL_FILE`, the UNet's own parameter names) into ``unet``. A
    ``conv_in`` taking more input channels (coordinate channels) replaces the UNet's, and its config says so."""
    from safetensors.torch import load_file
    state = load_file(str(path))
    bad = sorted(set(state) - set(unet.state_dict()))
    if bad:
        raise ValueError(f"{path} holds weights this UNet does not have: {bad[:3]}")
    w = state.get("conv_in.weight")
    if w is not None and w.shape[1] != unet.conv_in.in_channels:
        if "conv_in.bias" not in state:
            raise ValueError(f"{path} widens conv_in to {w.shape[1]} input channels but holds no conv_in.bias")
        old = unet.conv_in
        unet.conv_in = torch.nn.Conv2d(w.shape[1], old.out_channels, old.kernel_size, padding=old.padding).to(
            old.weight.device, old.weight.dtype)
        unet.register_to_config(in_channels=int(w.shape[1]))
    unet.load_state_dict(state, strict=False)


def merge_lora(model, path) -> int:
    """Merge a LoRA adapter (:data:`LORA_FILE` as diffusers' ``save_lora_adapter`` writes it: ``NAME.lora_A.weight``
    and ``NAME.lora_B.weight`` per module, ``lora_alpha`` and ``r`` in its ``lora_adapter_metadata``) into the
    weights of ``model`` (a UNet; the view model's decoder adapter: a VAE): ``W += alpha / r * B A`` (for a
    convolution, ``B``'s 1x1 kernel after ``A``'s). What ``model.load_lora_adapter(...)`` then ``model.fuse_lora()``
    computes, leaving plain modules (no peft layers in the way of attention processors and recorders). Returns the
    number of modules changed."""
    import json

    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})
    if not names or len(names) * 2 != len(state):
        raise ValueError(f"{path} is not a LoRA adapter (lora_A/lora_B pairs): {sorted(state)[:3]}")
    r = int(meta.get("r", state[f"{names[0]}.lora_A.weight"].shape[0]))
    scale = float(meta.get("lora_alpha", r)) / r
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            m = modules.get(name)
            if m is None:
                raise ValueError(f"{path} adapts {name!r}, which this model does not have")
            a, b = state[f"{name}.lora_A.weight"].float(), state[f"{name}.lora_B.weight"].float()
            delta = (b.flatten(1) @ a.flatten(1)).reshape(m.weight.shape) * scale
            m.weight.add_(delta.to(m.weight.dtype))
    return len(names)
