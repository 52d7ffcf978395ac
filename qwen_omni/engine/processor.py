"""Chat messages with media -> the exact tensors an Omni thinker consumes.

Steps, in the order the reference processors take them:
1. decode every media part (`encoders.media`), turn it into features (`encoders.preprocess`), and check the
   per-request budgets (images, video frames, audio seconds) with messages that say what to shrink;
2. render the checkpoint's chat template (one placeholder per media part) and tokenize it;
3. expand each placeholder in id space to as many tokens as its encoder will emit (for a video with its own
   sound, the family's audio-in-video interleave);
4. compute the TMRoPE position ids and rope delta.

Output names are the reference processor's (`input_ids`, `pixel_values`, `image_grid_thw`,
`pixel_values_videos`, `video_grid_thw`, `video_second_per_grid`, `input_features`,
`feature_attention_mask`) plus `position_ids`, `rope_deltas` and `cache_key` (ids with a content hash at each
media item, so a reused prefix never swaps one picture for another of the same size).

Audio features are padded as the family's reference pads them, padding frames included (they hold the
log-mel of the zero padding, not zeros): Qwen2.5-Omni pads every clip to 30 s (`padding="max_length"`, so
`input_features` is (n, 128, 3000)); Qwen3-Omni pads all clips of a request, a video's sound included, to the
longest one (`padding=True` over one feature-extractor call).

Deliberate difference: Qwen2.5-Omni's processor truncates audio at 30 s; we encode longer audio whole (its
encoder attends per 2-s chunk anyway), and the other clips' features are then zero-padded to its length
(masked out). Clips up to 30 s are featurised exactly as the reference does.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders import media, preprocess, sources, video

from ..errors import InputError
from ..models.omni_config import ThinkerConfig
from ..models.positions import RopeSpec, audio_in_video_tokens, family_rules, rope_index

N_SAMPLES_30S = 30 * 16000


@dataclass
class Budgets:
    """Per-request caps; a request over any of them is refused with a message saying what to shrink."""
    max_images: int = 16
    max_image_pixels: int = 40_000_000  # decoded size; larger uploads are refused before resizing
    max_video_frames: int = 768
    max_audio_seconds: float = 600.0
    max_videos: int = 4


@dataclass
class ProcessorConfig:
    """Image/video/audio settings from `preprocessor_config.json` (+ video config), family defaults else."""
    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    video_min_pixels: int
    video_max_pixels: int
    fps: float
    min_frames: int
    max_frames: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    n_mels: int
    pad_audio_to_30s: bool

    @classmethod
    def from_dir(cls, path: Path, cfg: ThinkerConfig) -> "ProcessorConfig":
        return cls.from_dicts(_read_json(path / "preprocessor_config.json"),
                              _read_json(path / "video_preprocessor_config.json"), cfg)

    @classmethod
    def from_dicts(cls, pre: dict, vid: dict, cfg: ThinkerConfig) -> "ProcessorConfig":
        """From the two files' contents; an empty `vid` means the image settings serve video too."""
        vid = vid or pre
        v = cfg.vision
        factor = v.patch_size * v.spatial_merge_size

        def pixels(d: dict, lo: int, hi: int) -> tuple[int, int]:
            size = d.get("size") or {}
            return (int(d.get("min_pixels", size.get("shortest_edge", lo))),
                    int(d.get("max_pixels", size.get("longest_edge", hi))))

        lo, hi = pixels(pre, 56 * 56, 28 * 28 * 1280)
        vlo, vhi = pixels(vid if vid is not pre else {}, 128 * factor * factor, 768 * factor * factor)
        return cls(patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                   min_pixels=lo, max_pixels=hi, video_min_pixels=vlo, video_max_pixels=vhi,
                   fps=float(vid.get("fps", 1.0 if cfg.is_qwen3 else 2.0)),
                   min_frames=int(vid.get("min_frames", 4)), max_frames=int(vid.get("max_frames", 768)),
                   image_mean=tuple(pre.get("image_mean", preprocess.OPENAI_CLIP_MEAN)),
                   image_std=tuple(pre.get("image_std", preprocess.OPENAI_CLIP_STD)),
                   n_mels=int(pre.get("feature_size", cfg.audio.num_mel_bins)), pad_audio_to_30s=not cfg.is_qwen3)


def _read_json(f: Path) -> dict:
    return json.loads(f.read_text()) if f.is_file() else {}


class Processor:
    def __init__(self, cfg: ThinkerConfig, pcfg: ProcessorConfig, budgets: Budgets | None = None):
        self.cfg, self.p, self.budgets = cfg, pcfg, budgets or Budgets()
        self.spec = RopeSpec(
            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id, audio_token_id=cfg.audio_token_id,
            vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
            audio_start_token_id=cfg.audio_start_token_id, audio_end_token_id=cfg.audio_end_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size, position_id_per_seconds=cfg.position_id_per_seconds,
            **family_rules(cfg.is_qwen3, cfg.seconds_per_chunk))

    # ---- media -> features ---------------------------------------------------------------------------
    def image(self, src) -> tuple[torch.Tensor, torch.Tensor]:
        img = media.load_image(src)
        if img.width * img.height > self.budgets.max_image_pixels:
            raise InputError(f"the image is {img.width}x{img.height}; the limit is "
                             f"{self.budgets.max_image_pixels / 1e6:.0f} megapixels: send a smaller image")
        p = self.p
        return preprocess.image_patches(img, p.patch_size, p.merge_size, p.temporal_patch_size, p.min_pixels,
                                        p.max_pixels, p.image_mean, p.image_std)

    def check_audio(self, wav: np.ndarray) -> np.ndarray:
        seconds = len(wav) / 16000
        if seconds > self.budgets.max_audio_seconds:
            raise InputError(f"the audio is {seconds:.0f} s long; the limit is {self.budgets.max_audio_seconds:.0f} s: "
                             f"trim it")
        return wav

    def audio_features(self, wav: np.ndarray, longest: int = 0) -> tuple[torch.Tensor, int]:
        """(features (n_mels, padded frames) float32, valid frames) of one clip among clips of at most `longest`
        samples in the same request: Qwen2.5 pads to 30 s (longer: whole), Qwen3 to the request's longest."""
        self.check_audio(wav)
        pad = max(N_SAMPLES_30S, len(wav)) if self.p.pad_audio_to_30s else max(len(wav), longest)
        return preprocess.log_mel(wav, self.p.n_mels, pad, truncate=False, return_padded=True)

    def video(self, src, use_audio: bool):
        p = self.p
        if isinstance(src, dict):  # already-decoded frames: {"frames": (T,H,W,3) uint8, "fps": f, "audio": ...}
            frames = src["frames"]
            frames = frames if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 \
                else video.stack_frames(frames)
            spf = float(src.get("seconds_per_frame", 1.0 / float(src.get("fps", p.fps))))
            wav = src.get("audio")
        else:
            info = video.probe(src)  # header only: refuse long videos before decoding their frames
            if info.duration * p.fps > self.budgets.max_video_frames * 1.5:
                raise InputError(f"the video lasts {info.duration:.0f} s, too long for the frame budget "
                                 f"({self.budgets.max_video_frames} frames at {p.fps:g} fps): send a shorter clip")
            v = video.load_video(src, fps=p.fps, min_frames=p.min_frames, max_frames=p.max_frames,
                                 with_audio=use_audio)
            frames, spf, wav = v.frames, v.seconds_per_frame, v.audio
            if use_audio and wav is None and v.audio_error:
                raise InputError(f"the video's audio track could not be decoded ({v.audio_error})")
        if frames.shape[0] > self.budgets.max_video_frames:
            raise InputError(f"the video gives {frames.shape[0]} frames; the limit is {self.budgets.max_video_frames}: "
                             f"send a shorter clip or a lower fps")
        if use_audio and wav is None:
            raise InputError("use_audio_in_video was asked for, but this video has no audio track: "
                             "turn the option off or send a video with sound")
        pix, grid = preprocess.video_patches(frames, p.patch_size, p.merge_size, p.temporal_patch_size,
                                             p.video_min_pixels, p.video_max_pixels, p.image_mean, p.image_std)
        return pix, grid, spf * p.temporal_patch_size, (np.asarray(wav, np.float32) if use_audio else None)

    # ---- messages -> inputs --------------------------------------------------------------------------
    def __call__(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                 use_audio_in_video: bool = False) -> dict[str, Any]:
        messages, parts = media_parts(messages, use_audio_in_video)
        n_images, n_videos = sum(k == "image" for k, _, _ in parts), sum(k == "video" for k, _, _ in parts)
        if n_images > self.budgets.max_images or n_videos > self.budgets.max_videos:  # before decoding any
            raise InputError(f"too many attachments ({n_images} images, {n_videos} videos); the limits are "
                             f"{self.budgets.max_images} images and {self.budgets.max_videos} videos per request: "
                             f"send fewer")
        images, videos, audios = [], [], []  # in prompt order
        hashes: dict[str, list[str]] = {"image": [], "video": [], "audio": []}
        for kind, src, with_audio in parts:
            try:
                src = resolve(kind, src)  # download / decode the reference once: probe, decode and hash reuse it
                if kind == "image":
                    images.append(self.image(src))
                elif kind == "audio":
                    audios.append(self.check_audio(media.load_audio(src)))  # features in build: padding
                else:
                    videos.append(self.video(src, with_audio))
            except (media.MediaError, InputError) as e:
                where = _which_source(e, kind, src, len(hashes[kind]) + 1)
                if where is None:
                    raise
                raise type(e)(f"{where}: {e}") from e
            hashes[kind].append(content_hash(src))
        text = tokenizer.render(messages, add_generation_prompt=add_generation_prompt)
        ids = tokenizer.encode(text)
        return self.build(ids, images, videos, audios, hashes)

    def build(self, ids: list[int], images, videos, audios, hashes) -> dict[str, Any]:
        """`audios`: waveforms (16-kHz float32) of the audio parts; a video's sound rides in `videos`."""
        c, merge2 = self.cfg, self.p.merge_size ** 2
        out: dict[str, Any] = {}
        # Qwen3 pads every clip to the request's longest, so its length is needed before any clip is featurised.
        longest = max([len(w) for w in audios] + [len(v[3]) for v in videos if v[3] is not None], default=0)
        # Audio of a video joins the audio features, in prompt order: a video's sound comes where its
        # placeholder is, relative to plain audio parts.
        audio_feats: list[tuple[torch.Tensor, int]] = []
        audio_counts: list[int] = []  # audio tokens per audio (video sound included), in prompt order
        expanded, key = [], []
        skip_vision_end = False
        it_img, it_vid, it_aud = iter(range(len(images))), iter(range(len(videos))), iter(range(len(audios)))
        for t in ids:
            if skip_vision_end and t == c.vision_end_token_id:  # already emitted by the audio-in-video block
                skip_vision_end = False
                continue
            if t == c.image_token_id:
                i = _next(it_img, "image")
                n = int(images[i][1].prod()) // merge2
                expanded += [t] * n
                key += [("image", hashes["image"][i])] + [t] * (n - 1)
            elif t == c.audio_token_id:
                i = _next(it_aud, "audio")
                feats = self.audio_features(audios[i], longest)
                n = self._audio_tokens(feats[1])
                audio_feats.append(feats)
                audio_counts.append(n)
                expanded += [t] * n
                key += [("audio", hashes["audio"][i])] + [t] * (n - 1)
            elif t == c.video_token_id:
                i = _next(it_vid, "video")
                pix, grid, spg, wav = videos[i]
                per_frame = int(grid[0, 1] * grid[0, 2]) // merge2
                if wav is None:
                    seq = [t] * (per_frame * int(grid[0, 0]))
                else:
                    feats = self.audio_features(wav, longest)
                    n = self._audio_tokens(feats[1])
                    audio_feats.append(feats)
                    audio_counts.append(n)
                    # the block brings its own <vision_bos>/<vision_eos>: drop the template's pair
                    if not expanded or expanded[-1] != c.vision_start_token_id:
                        raise InputError("the chat template must wrap a video placeholder in vision start/end")
                    expanded.pop()
                    key.pop()
                    seq = audio_in_video_tokens(self.spec, grid[0].tolist(), spg, n)
                    skip_vision_end = True
                expanded += seq
                key += [("video", hashes["video"][i])] + seq[1:]
            else:
                expanded.append(t)
                key.append(t)
        for kind, it in (("image", it_img), ("video", it_vid), ("audio", it_aud)):
            if next(it, None) is not None:
                raise InputError(f"the chat template placed fewer {kind} placeholders than {kind} parts were given")
        input_ids = torch.tensor([expanded], dtype=torch.long)
        out["input_ids"] = input_ids
        if images:
            out["pixel_values"] = _join([p for p, _ in images])
            out["image_grid_thw"] = _join([g for _, g in images])
        if videos:
            out["pixel_values_videos"] = _join([v[0] for v in videos])
            out["video_grid_thw"] = _join([v[1] for v in videos])
            out["video_second_per_grid"] = torch.tensor([v[2] for v in videos], dtype=torch.float32)
        if audio_feats:
            frames = max(f.shape[1] for f, _ in audio_feats)
            feats = torch.zeros(len(audio_feats), self.p.n_mels, frames)
            mask = torch.zeros(len(audio_feats), frames, dtype=torch.int32)  # the reference's dtype
            for j, (f, n) in enumerate(audio_feats):
                feats[j, :, :f.shape[1]] = f
                mask[j, :n] = 1
            out["input_features"], out["feature_attention_mask"] = feats, mask
        pos, deltas = rope_index(input_ids, self.spec, out.get("image_grid_thw"), out.get("video_grid_thw"),
                                 out.get("video_second_per_grid"),
                                 audio_counts or None,
                                 use_audio_in_video=any(v[3] is not None for v in videos))
        out["position_ids"], out["rope_deltas"] = pos, deltas
        out["cache_key"] = key
        return out

    def _audio_tokens(self, frames: int) -> int:
        return int(self.cfg.audio_output_lengths(torch.tensor([frames]))[0])


def media_parts(messages: list[dict], use_audio_in_video: bool) -> tuple[list[dict], list[tuple[str, Any, bool]]]:
    """(messages with every media part as {"type": kind, kind: value}, [(kind, value, use its sound)] in prompt
    order). OpenAI part types (image_url, input_audio, video_url, audio_url) are rewritten so that a message list
    works the same here and over HTTP, and the chat template (which knows only Qwen's types) places them. A
    video given as a list of frames becomes {"frames", "fps"} (qwen-omni-utils' default for lists: 2 fps)."""
    out, parts = [], []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError("each message must be a dict with 'role' and 'content'")
        if isinstance(m["content"], str):
            out.append(m)
            continue
        if not isinstance(m["content"], (list, tuple)):
            raise InputError("message content must be a string or a list of parts")
        content = []
        for part in m["content"]:
            found = sources.part_media(part)
            if found is None:
                if isinstance(part, dict) and (part.get("type") == "text" or "type" not in part and "text" in part):
                    content.append(part)
                    continue
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InputError(f"unknown content part type {kind!r}; use text, image, audio or video (or "
                                 f"OpenAI's image_url, input_audio, video_url, audio_url)")
            kind, src = found
            if src is None:
                raise InputError(f"a {kind} part has no '{kind}' value")
            if kind == "video" and (isinstance(src, (list, tuple)) or isinstance(src, np.ndarray) and src.ndim == 4):
                src = {"frames": src, "fps": float(part.get("fps", 2.0))}
            with_audio = bool(part.get("use_audio_in_video", use_audio_in_video)) if kind == "video" else False
            parts.append((kind, src, with_audio))
            content.append({**{k: v for k, v in part.items() if k not in sources.OPENAI_PARTS},
                            "type": kind, kind: src})
        out.append({**m, "content": content})
    return out, parts


def resolve(kind: str, src: Any) -> Any:
    """A string reference -> a checked path or the downloaded bytes (`encoders.sources`); frame lists -> an array."""
    if isinstance(src, dict) and "frames" in src and not isinstance(src["frames"], np.ndarray):
        return {**src, "frames": video.stack_frames(src["frames"])}
    return sources.resolve(src, kind)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, except that a single item is passed through: a follow-up turn re-sends its image, and copying
    its cached patches (19 MB for an 896 px image) took longer than prefilling the new question."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _next(it, kind: str) -> int:
    i = next(it, None)
    if i is None:
        raise InputError(f"the prompt has more {kind} placeholders than {kind} parts (do not type placeholder "
                         f"tokens into the text)")
    return i


def _which_source(err: Exception, kind: str, src, nth: int) -> str | None:
    """How an error message should name the attachment it is about; None when it names the file already."""
    label = media._label(src)  # "'name.ext'" for files, "upload" for in-memory data
    if label in ("''", "upload") or isinstance(src, str) and src.lower().startswith("data:"):
        return f"{kind} {nth} of the request"  # nothing better to name it by (and the server renames these)
    if label in str(err):
        return None
    return f"{kind} {label}"


def content_hash(src) -> str:
    """A short digest of a media value, so cached states are only reused for the same content."""
    h = hashlib.sha1()
    if isinstance(src, (str, Path)):
        # The bytes, not path/mtime: a web client re-uploads the same file each turn (new copy, new mtime), and
        # the state of the earlier turn must still be reused. Hashing the bytes costs little beside decoding.
        p = Path(src)
        if p.is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(src).encode())
    elif isinstance(src, (bytes, bytearray)):
        h.update(src)
    elif isinstance(src, tuple):
        h.update(str(src[0]).encode())
        h.update(np.ascontiguousarray(src[1]).tobytes())
    elif isinstance(src, dict):
        for k in sorted(src):
            v = src[k]
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray) else str(v).encode())
    elif isinstance(src, np.ndarray):
        h.update(np.ascontiguousarray(src).tobytes())
    else:  # PIL image or similar
        tobytes = getattr(src, "tobytes", None)
        h.update(tobytes() if tobytes else repr(src).encode())
    return h.hexdigest()[:16]


def build_processor(path: Path, model: torch.nn.Module):
    """The media processor of an Omni thinker (None for text-only models)."""
    if not isinstance(getattr(model, "cfg", None), ThinkerConfig):
        return None
    return Processor(model.cfg, ProcessorConfig.from_dir(path, model.cfg))
