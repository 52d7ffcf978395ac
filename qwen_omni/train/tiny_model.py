"""The tiny Qwen3-Omni thinker shipped in `assets/tiny-omni`: tokenizer, config, initialisation, and the
official (transformers) on-disk format.

Design:
- Tokenizer: byte-level BPE trained with `tokenizers` on train-split text of the synthetic world only
  (questions, answers, captions, chit-chat; never held-out wording). Digits are split one per token (as Qwen
  does), so "357" is "3","5","7" and every number has one spelling. The special tokens sit at fixed low ids
  0..9. Chat template: ChatML with Qwen3-Omni's media tokens and a default system prompt.
- Model: our own `Thinker` (vision encoder with DeepStack, AuT audio encoder, MoE decoder), built from a
  `config.json` that is exactly a transformers `Qwen3OmniMoeThinkerConfig` dict, so that
  `Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained` and `qwen_omni.load` read the same files.
- Save: our parameter names already are the checkpoint's; the only mapping is the MoE experts, which we keep
  stacked (`experts.gate_up_proj` (E, 2I, H) gate rows first, `experts.down_proj` (E, H, I)) and write per
  expert (`mlp.experts.E.{gate,up,down}_proj.weight`), as transformers' save_pretrained does.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..engine.processor import Processor, ProcessorConfig
from ..models.omni_config import ThinkerConfig
from ..models.registry import build_model
from ..models.thinker import Thinker
from ..synthetic.tasks import TASKS, make_sample, text_parts

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]
TOKEN_IDS = {t: i for i, t in enumerate(SPECIAL_TOKENS)}  # fixed low ids
# what a checkpoint's tokenizer may consist of (ours: the first two; a real Qwen checkpoint: some of the rest too)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "vocab.json", "merges.txt", "special_tokens_map.json")
SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML with Qwen3-Omni's media tokens (the placeholder-equivalent subset of the published template, the same
# as tests/tiny_omni.Q3_TEMPLATE) and a default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Sizes. Images of the synthetic world are 128-224 px; every image is resized to about 224*224 px (min = max
# pixels): 49 merged tokens of 32x32 px each. Small images are scaled up, not kept small: an 18 px digit in a
# 128 px image becomes 31 px, so a token holds fewer glyphs (the number accuracy before and after the change is in
# docs/training-notes.md).
# Video frames are 96-128 px at 2 fps; 96*96 gives 9 tokens per 2-frame step.
PATCH, MERGE, TEMPORAL = 16, 2, 2
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 224 * 224, 224 * 224
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 32 * 32, 96 * 96
VIDEO_FPS = 2.0

SIZES = {
    # the shipped model
    "tiny": dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, experts=8, top_k=2, moe_inter=256,
                 mrope=[12, 10, 10], v_hidden=128, v_depth=4, v_heads=4, v_inter=512, v_deepstack=[1, 2, 3],
                 a_dmodel=128, a_layers=3, a_heads=4, a_ffn=512, a_down=32),
    # for tests: same structure, a fraction of the size
    "micro": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=8, top_k=2, moe_inter=32,
                  mrope=[2, 3, 3], v_hidden=32, v_depth=2, v_heads=2, v_inter=64, v_deepstack=[0, 1],
                  a_dmodel=32, a_layers=1, a_heads=2, a_ffn=64, a_down=8),
}


# ---------------------------------------------------------------- tokenizer

def corpus_texts(n_per_task: int = 150, seed0: int = 7_000_000) -> list[str]:
    """Train-split text of the synthetic world: every user text part and every answer of n_per_task samples
    per task (seeds disjoint from training's and eval's), plus the system prompt."""
    texts = [SYSTEM_PROMPT]
    for task in TASKS:
        for i in range(n_per_task):
            s = make_sample(task, seed0 + i, "train")
            for m in s.messages:
                texts.extend(text_parts(m["content"]))
            texts.append(s.answer)
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Byte-level BPE (`tokenizers`), digits split singly, specials at ids 0..9."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    for t, i in TOKEN_IDS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def save_tokenizer(tok, d: Path) -> None:
    d = Path(d)
    tok.save(str(d / "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in TOKEN_IDS.items()}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|audio_pad|>",
        "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
        "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
        "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE}, indent=2))


# ---------------------------------------------------------------- config

def config_dict(vocab_size: int, size: str = "tiny") -> dict:
    """A complete `Qwen3OmniMoeThinkerConfig` dict (what transformers writes as config.json)."""
    s = SIZES[size]
    return {
        "architectures": ["Qwen3OmniMoeThinkerForConditionalGeneration"],
        "model_type": "qwen3_omni_moe_thinker",
        "audio_config": {
            "model_type": "qwen3_omni_moe_audio_encoder", "num_mel_bins": 128, "encoder_layers": s["a_layers"],
            "encoder_attention_heads": s["a_heads"], "encoder_ffn_dim": s["a_ffn"], "d_model": s["a_dmodel"],
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "activation_function": "gelu",
            "scale_embedding": False, "initializer_range": 0.02, "max_source_positions": 1500, "n_window": 50,
            "output_dim": s["hidden"], "n_window_infer": 800, "conv_chunksize": 500,
            "downsample_hidden_size": s["a_down"]},
        "vision_config": {
            "model_type": "qwen3_omni_moe_vision_encoder", "depth": s["v_depth"], "hidden_size": s["v_hidden"],
            "hidden_act": "gelu_pytorch_tanh", "intermediate_size": s["v_inter"], "num_heads": s["v_heads"],
            "in_channels": 3, "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL,
            "out_hidden_size": s["hidden"], "num_position_embeddings": 256,
            "deepstack_visual_indexes": s["v_deepstack"], "initializer_range": 0.02},
        "text_config": {
            "model_type": "qwen3_omni_moe_text", "vocab_size": vocab_size, "hidden_size": s["hidden"],
            "intermediate_size": 2 * s["moe_inter"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"],
            "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
            "rms_norm_eps": 1e-6, "use_cache": True, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": s["mrope"],
                                "interleaved": True},
            "attention_bias": False, "attention_dropout": 0.0, "sliding_window": None,
            "decoder_sparse_step": 1, "moe_intermediate_size": s["moe_inter"], "num_experts_per_tok": s["top_k"],
            "num_experts": s["experts"], "norm_topk_prob": True, "output_router_logits": False,
            "router_aux_loss_coef": 0.001, "mlp_only_layers": [], "bos_token_id": None,
            "eos_token_id": TOKEN_IDS["<|im_end|>"], "pad_token_id": TOKEN_IDS["<|endoftext|>"]},
        "audio_token_id": TOKEN_IDS["<|audio_pad|>"], "image_token_id": TOKEN_IDS["<|image_pad|>"],
        "video_token_id": TOKEN_IDS["<|video_pad|>"], "vision_start_token_id": TOKEN_IDS["<|vision_start|>"],
        "vision_end_token_id": TOKEN_IDS["<|vision_end|>"], "audio_start_token_id": TOKEN_IDS["<|audio_start|>"],
        "audio_end_token_id": TOKEN_IDS["<|audio_end|>"], "user_token_id": 872,
        "position_id_per_seconds": 13, "initializer_range": 0.02, "tie_word_embeddings": False,
        "dtype": "float32",
    }


def processor_configs() -> tuple[dict, dict]:
    """(preprocessor_config.json, video_preprocessor_config.json) as transformers' processors read them."""
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    pre = {"processor_class": "Qwen3OmniMoeProcessor", "image_processor_type": "Qwen2VLImageProcessor",
           "feature_extractor_type": "WhisperFeatureExtractor", "patch_size": PATCH, "merge_size": MERGE,
           "temporal_patch_size": TEMPORAL, "min_pixels": IMAGE_MIN_PIXELS, "max_pixels": IMAGE_MAX_PIXELS,
           "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
           "image_mean": mean, "image_std": std, "do_resize": True, "do_rescale": True, "do_normalize": True,
           "do_convert_rgb": True, "rescale_factor": 1 / 255, "feature_size": 128, "sampling_rate": 16000,
           "hop_length": 160, "n_fft": 400, "chunk_length": 300, "n_samples": 4800000, "nb_max_frames": 30000,
           "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "dither": 0.0}
    vid = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": PATCH, "merge_size": MERGE,
           "temporal_patch_size": TEMPORAL, "min_pixels": VIDEO_MIN_PIXELS, "max_pixels": VIDEO_MAX_PIXELS,
           "size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
           "image_mean": mean, "image_std": std, "fps": VIDEO_FPS, "min_frames": 2, "max_frames": 64,
           "do_sample_frames": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
           "do_convert_rgb": True, "rescale_factor": 1 / 255}
    return pre, vid


def generation_config() -> dict:
    return {"eos_token_id": [TOKEN_IDS["<|im_end|>"], TOKEN_IDS["<|endoftext|>"]],
            "pad_token_id": TOKEN_IDS["<|endoftext|>"], "do_sample": False, "max_new_tokens": 64}


# ---------------------------------------------------------------- model

def build_thinker(cfg_dict: dict, seed: int = 0):
    """Our Thinker from a config dict, initialised like transformers does (N(0, 0.02), norms 1, biases 0)."""
    torch.manual_seed(seed)
    model = Thinker(ThinkerConfig.parse(cfg_dict))
    init_weights(model)
    return model


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            p.zero_()
        elif p.dim() >= 3 or name.endswith("conv_out.weight"):
            # Convolutions (and the audio front end's conv_out) get fan-in (He) scaling: with N(0, 0.02) the
            # audio encoder's three 3x3 convs shrank the mel signal ~1e4-fold under its sinusoidal positions,
            # and pitch (a global property) stayed at chance.
            p.normal_(0, (2.0 / p[0].numel()) ** 0.5)
        elif "norm" in name or ".ln" in name or name.endswith(("ln_q.weight", "ln_post.weight")):
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0, std)
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0, std)


EXPERTS_STACKED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under transformers' thinker checkpoint names: stacked experts -> per-expert tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        if name not in dict(model.named_parameters()) and not name.endswith(".experts.gate_up_proj") \
                and not name.endswith(".experts.down_proj"):
            continue  # buffers (rotary tables, audio positions) are not checkpoint tensors
        m = EXPERTS_STACKED.match(name)
        if not m:
            out[name] = p.detach().contiguous()
            continue
        prefix, kind = m.groups()
        for e in range(p.shape[0]):
            if kind == "gate_up_proj":
                gate, up = p[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.detach().contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.detach().contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = p[e].detach().contiguous()
    return out


def save_pretrained(model: nn.Module, tokenizer_dir: Path | None, out: Path, *, tok=None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write the checkpoint directory: config.json, model.safetensors, tokenizer files, processor configs,
    generation_config.json. The tokenizer comes from `tok` (a tokenizers.Tokenizer) or is copied from
    `tokenizer_dir` (the run's tokenizer, or the checkpoint a fine-tune started from), as are that folder's processor
    and generation configs where it has them."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model, "config_dict", None)
    if not cfg:
        raise ValueError("model has no config dict attached (build it with build_thinker)")
    # the dtype the tensors are stored in, as transformers writes it (from_pretrained's dtype="auto" reads it)
    (out / "config.json").write_text(json.dumps({**cfg, "dtype": str(dtype).removeprefix("torch.")}, indent=2))
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_state_dict(model).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        save_tokenizer(tok, out)
    src = Path(tokenizer_dir) if tokenizer_dir is not None else None
    same = src is not None and src.resolve() == out.resolve()
    if src is not None and tok is None and not same:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                (out / name).write_bytes((src / name).read_bytes())
    pre, vid = processor_configs()
    # A fine-tuned checkpoint keeps its source's processor and generation settings (a real Qwen3-Omni thinker's
    # image sizes are not the tiny model's); from scratch, the tiny model's own are written.
    for name, default in (("preprocessor_config.json", pre), ("video_preprocessor_config.json", vid),
                          ("generation_config.json", generation_config())):
        if src is not None and (src / name).is_file():
            if not same:
                (out / name).write_bytes((src / name).read_bytes())
        else:
            (out / name).write_text(json.dumps(default, indent=2))
    return out


def new_model(vocab_size: int, size: str = "tiny", seed: int = 0):
    """A freshly initialised Thinker with its config dict attached (for save_pretrained)."""
    cfg = config_dict(vocab_size, size)
    model = build_thinker(cfg, seed)
    model.config_dict = cfg
    return model


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    """Load a checkpoint directory (ours or any thinker) for training: parameters trainable, config attached."""
    model, _ = build_model(Path(path), dtype, torch.device("cpu"))
    model.config_dict = json.loads((Path(path) / "config.json").read_text())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def processor_for(cfg: ThinkerConfig, src: Path | None = None) -> "object":
    """The media processor for training and the in-training eval: `src`'s preprocessor configs when it has them
    (fine-tuning a checkpoint keeps its image sizes and normalisation), the tiny model's own else (from scratch)."""
    if src is not None and (Path(src) / "preprocessor_config.json").is_file():
        return Processor(cfg, ProcessorConfig.from_dir(Path(src), cfg))
    return Processor(cfg, ProcessorConfig.from_dicts(*processor_configs(), cfg))


def count_parameters(model: nn.Module) -> dict[str, int]:
    groups = {"visual": 0, "audio_tower": 0, "model": 0, "lm_head": 0}
    for n, p in model.named_parameters():
        groups[n.split(".")[0]] += p.numel()
    groups["total"] = sum(groups.values())
    return groups
