"""Tiny random Omni thinker checkpoints built with transformers' own classes, plus a small tokenizer with the
family's special tokens and chat template, and a preprocessor config: everything `qwen_omni.load` reads."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

# The published Qwen2.5-Omni chat template (../shared/reference/chat-templates.md).
Q25_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3-Omni uses the same ChatML framing with its own token names. The checkpoint's published template also
# handles tools and thinking; it was not available offline, so the tests use this placeholder-equivalent subset.
Q3_TEMPLATE = (Q25_TEMPLATE.replace("<|vision_bos|>", "<|vision_start|>").replace("<|vision_eos|>", "<|vision_end|>")
               .replace("<|IMAGE|>", "<|image_pad|>").replace("<|VIDEO|>", "<|video_pad|>")
               .replace("<|audio_bos|>", "<|audio_start|>").replace("<|audio_eos|>", "<|audio_end|>")
               .replace("<|AUDIO|>", "<|audio_pad|>"))
TOKENS = {
    "qwen2_5": dict(image="<|IMAGE|>", video="<|VIDEO|>", audio="<|AUDIO|>", vision_start="<|vision_bos|>",
                    vision_end="<|vision_eos|>", audio_start="<|audio_bos|>", audio_end="<|audio_eos|>"),
    "qwen3": dict(image="<|image_pad|>", video="<|video_pad|>", audio="<|audio_pad|>",
                  vision_start="<|vision_start|>", vision_end="<|vision_end|>", audio_start="<|audio_start|>",
                  audio_end="<|audio_end|>"),
}
CORPUS = ["what is in this picture? describe the image. what do you hear in the audio clip?",
          "the quick brown fox jumps over the lazy dog. a red circle and a blue square.",
          "how many beeps? three. is the pitch high or low? it moves to the left."] * 40


def save_tokenizer(d: Path, family: str, extra: tuple[str, ...] = ()) -> dict[str, int]:
    """A tiny BPE with the family's special tokens (+ `extra` ones) -> {name: id}; `extra` tokens and the chat
    markers are in it under their own text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *TOKENS[family].values(), *extra]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    ids = {k: tok.token_to_id(v) for k, v in TOKENS[family].items()}
    named = {f"{k}_token": v for k, v in TOKENS[family].items()} if family == "qwen3" else {}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": Q3_TEMPLATE if family == "qwen3" else Q25_TEMPLATE, **named}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|im_end|>")]}))
    if extra:
        ids.update({t: tok.token_to_id(t) for t in ["<|im_start|>", "<|im_end|>", *extra]})
    return ids


# The tiny Qwen3-Omni parts every test builds (vocab, token ids and context length are the caller's).
Q3_AUDIO = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=128,
                max_source_positions=1500, n_window=50, n_window_infer=800, conv_chunksize=500,
                downsample_hidden_size=32, output_dim=64)
Q3_VISION = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
                 temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=2304,
                 deepstack_visual_indexes=[0, 1, 2])
Q3_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
               norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                     "mrope_section": [2, 3, 3], "interleaved": True})
# A tiny Qwen3-Omni talker (MoE with a shared expert, 4 code groups) and Code2Wav, for a 64-wide thinker.
Q3_TALKER = dict(
    text_config=dict(vocab_size=3072, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_intermediate_size=16,
                     shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2],
                                      "interleaved": True}),
    code_predictor_config=dict(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_code_groups=4),
    num_code_groups=4, thinker_hidden_size=64, accept_hidden_layer=2, codec_eos_token_id=2150,
    codec_nothink_id=2155, codec_think_bos_id=2156, codec_think_eos_id=2157, codec_pad_id=2148, codec_bos_id=2149,
    position_id_per_seconds=13, spatial_merge_size=2)
Q3_CODE2WAV = dict(codebook_size=2048, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=64, num_hidden_layers=1, num_quantizers=4, decoder_dim=64, sliding_window=8,
                   max_position_embeddings=1000, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def part(base: dict, **fields) -> dict:
    """A fresh (deep) copy of one of the Q3_* parts with `fields` set: configs may edit nested dicts in place."""
    return {**copy.deepcopy(base), **fields}


def init_stacked_experts(model: torch.nn.Module, std: float = 0.02) -> None:
    """Seeded normal values for every stacked MoE expert tensor (`experts.gate_up_proj`, `experts.down_proj`).

    transformers 5.24's `_init_weights` skips them in the Qwen3-Omni talker (and in the full model's thinker): they
    stay `torch.empty`, i.e. whatever memory held, usually denormals but now and then NaN, which once made a random
    talker's logits NaN in one CI run out of several. Call right after building a model, under a fixed seed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0, std)


def thinker_config(family: str, ids: dict[str, int], vocab: int = 600):
    if family == "qwen3":
        from transformers import Qwen3OmniMoeThinkerConfig as C

        return C(audio_config=part(Q3_AUDIO), vision_config=part(Q3_VISION),
                 text_config=part(Q3_TEXT, vocab_size=vocab, max_position_embeddings=8192),
                 audio_token_id=ids["audio"], image_token_id=ids["image"], video_token_id=ids["video"],
                 audio_start_token_id=ids["audio_start"], audio_end_token_id=ids["audio_end"],
                 vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
                 position_id_per_seconds=13)
    from transformers import Qwen2_5OmniThinkerConfig as C

    return C(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=64),
        vision_config=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3]),
        text_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        audio_token_index=ids["audio"], image_token_index=ids["image"], video_token_index=ids["video"],
        audio_start_token_id=ids["audio_start"], audio_end_token_id=ids["audio_end"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        position_id_per_seconds=25, seconds_per_chunk=2)


def make_thinker(d: Path, family: str, seed: int = 0):
    """Save a tiny random thinker of `family` ("qwen2_5" | "qwen3") with tokenizer files; return the HF model."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration, Qwen3OmniMoeThinkerForConditionalGeneration

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(d, family)
    cls = Qwen3OmniMoeThinkerForConditionalGeneration if family == "qwen3" else Qwen2_5OmniThinkerForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(thinker_config(family, ids)).eval()
    with torch.no_grad():  # spread the weights so that a miswired part changes the logits visibly
        for name, p in model.named_parameters():
            if "norm" not in name and "ln" not in name:
                p.normal_(0, 0.08)
    model.save_pretrained(d)
    patch = 16 if family == "qwen3" else 14
    (d / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": patch, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 1280, "feature_size": 128, "sampling_rate": 16000,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return model
