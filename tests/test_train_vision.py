"""Stage (v): dense per-token labels for the vision encoder (`qwen_omni.train.vision`).

- labels land on the tokens whose pixels hold the object, in the encoder's merged-token order (checked against
  the patch rows the processor makes, so a transposed or shuffled grid fails);
- `render_text(boxes=True)` draws the same image and returns one box per character, left to right;
- the heads train every view the decoder gets of the vision tokens (merged tokens, then each DeepStack sum);
- a few steps on a micro model lower the loss, and `--steps-v` runs the stage inside `qwen_omni.train.loop`, after
  which `--train no-vision-tower` leaves the tower's blocks as stage (v) left them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from qwen_omni.synthetic import media as sm
from qwen_omni.train import tiny_model as tm
from qwen_omni.train import loop as T
from qwen_omni.train import vision as V


@pytest.fixture(scope="module")
def micro():
    model = tm.new_model(400, "micro", seed=0)
    return model, tm.processor_for(model.cfg)


def test_labels_follow_the_encoders_token_order(micro):
    """A red square in the second token row, third column of a 7x7-token image: only that token (and no other)
    is labelled red/square/centre, and the patch rows of that token are the red ones."""
    _, proc = micro
    w, h = 224, 224  # the tiny model's pixel budget exactly, so smart_resize keeps it: 7 x 7 tokens of 32 px
    img = Image.new("RGB", (w, h), (230, 230, 230))
    box = (2 * 32 + 4, 1 * 32 + 4, 3 * 32 - 4, 2 * 32 - 4)
    ImageDraw.Draw(img).rectangle(box, fill=sm.PALETTE["red"])
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=1)
    classes = {"shape": [0, sm.SHAPES.index("square") + 1], "colour": [0, sm.COLORS.index("red") + 1],
               "char": [0, 0]}
    pix, grid = proc.image(img)
    gh, gw = int(grid[0, 1]) // 2, int(grid[0, 2]) // 2
    assert (gh, gw) == (7, 7)
    lab = V.token_labels(np.asarray(mask), classes, [((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)], (w, h),
                         (gh, gw), 32)
    tok = 1 * gw + 2
    for k in ("shape", "colour", "centre"):
        assert lab[k].nonzero().flatten().tolist() == [tok], k
    assert lab["colour"][tok] == sm.COLORS.index("red") + 1
    assert torch.allclose(lab["where"][tok], torch.tensor([1.5 / 7, 2.5 / 7]))
    # Patch rows come in merge blocks of 4: token i's pixels are rows 4i..4i+3. Red = high R, low G (normalised).
    rows = pix.view(gh * gw, 4, 3, -1)  # (token, patch in block, channel, tp*P*P)
    redness = (rows[:, :, 0] - rows[:, :, 1]).mean((1, 2))
    assert int(redness.argmax()) == tok and redness[tok] > 0.5


def test_read_slots_name_every_glyph_once_in_reading_order():
    """Glyph centres at x = 10, 20 (token column 0) and 40 (column 1) of token row 1: the first token reads "3" then
    "5", the second "7"; nothing else is named, and `char` (coverage) is untouched by the slots."""
    w, h = 192, 128  # a 4 x 6 grid of 32 px tokens
    glyphs = [(V.CHARS.index(c) + 1, x, 40.0) for c, x in (("3", 10.0), ("5", 20.0), ("7", 40.0))]
    lab = V.token_labels(np.zeros((h, w), np.uint8), {"shape": [0], "char": [0]}, [], (w, h), (4, 6), 32, glyphs)
    first, second = 1 * 6 + 0, 1 * 6 + 1
    read = lambda t: "".join(V.CHARS[int(lab[f"read{k}"][t]) - 1] for k in range(V.READ_SLOTS)  # noqa: E731
                             if lab[f"read{k}"][t] > 0)
    assert (read(first), read(second)) == ("35", "7")
    named = sum(int((lab[f"read{k}"] > 0).sum()) for k in range(V.READ_SLOTS))
    assert named == 3 and not lab["char"].any()


def test_render_text_boxes():
    a = sm.render_text(np.random.default_rng(3), "357")
    b, boxes = sm.render_text(np.random.default_rng(3), "357", boxes=True)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert [c for c, _ in boxes] == ["3", "5", "7"]
    xs = [bx[0] for _, bx in boxes]
    assert xs == sorted(xs)
    for _, (x0, y0, x1, y1) in boxes:
        assert 0 <= x0 < x1 <= b.width and 0 <= y0 < y1 <= b.height


def test_batch_labels_cover_every_token(micro):
    _, proc = micro
    b = V.make_batch(np.random.default_rng(0), proc, 6, augment_p=0.5)
    n_tok = int(b["image_grid_thw"].prod(-1).sum()) // 4
    assert all(v.shape[0] == n_tok for v in b["labels"].values())
    assert b["pixel_values"].shape[0] == 4 * n_tok
    assert (b["labels"]["shape"] > 0).any() or (b["labels"]["char"] > 0).any()
    assert set(b["labels"]) == set(V.HEADS) | {"where"}


def test_heads_read_every_view_the_decoder_gets(micro):
    """The merged tokens, then the running sum after each DeepStack addition, as `TextModel` adds them."""
    model, proc = micro
    b = V.make_batch(np.random.default_rng(3), proc, 2, augment_p=0.0)
    with torch.no_grad():
        feats, deep = model.visual(b["pixel_values"], b["image_grid_thw"])
    views = V.decoder_views(feats, deep)
    assert len(deep) == len(model.cfg.vision.deepstack_visual_indexes) and len(views) == len(deep) + 1
    torch.testing.assert_close(views[0], feats)
    torch.testing.assert_close(views[-1], feats + sum(deep))
    assert V.decoder_views(feats, None) == [feats]


def test_stage_v_lowers_the_loss(micro):
    model, proc = micro
    torch.manual_seed(0)
    logs = []
    done = V.run_stage_v(model, proc, 30, batch=6, lr=3e-3, seed=1, log=logs.append, log_every=5)
    assert done == 30
    losses = [float(m.split(" loss ")[1].split()[0]) for m in logs]
    assert np.mean(losses[-2:]) < losses[0], losses
    assert all(p.requires_grad for p in model.parameters())  # the next stage picks its own parameters


def test_train_runs_stage_v_then_keeps_the_tower(tmp_path):
    src = tmp_path / "src"
    tok = tm.train_tokenizer(["hi there, what colour 0123456789"] * 4, vocab_size=300)
    tm.save_pretrained(tm.new_model(tok.get_vocab_size(), "micro", seed=0), None, src, tok=tok)
    run, out = tmp_path / "run", tmp_path / "out"
    T.train(T.parse_args(["--run", str(run), "--init", str(src), "--steps-v", "3", "--batch-v", "2",
                          "--train", "no-vision-tower", "--steps", "2", "--batch", "2", "--eval-every", "0",
                          "--no-tqdm", "--augment", "0", "--out", str(out)]))
    log = (run / "log.txt").read_text()
    assert "stage v: done after 3 steps" in log and "stage b: 2 steps, training no-vision-tower" in log
    base, tuned = tm.load_model(src).state_dict(), tm.load_model(out).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert any(k.startswith("visual.blocks.") for k in changed)  # stage v trained the tower
    assert any(k.startswith("model.") for k in changed)          # stage b trained the decoder
    state = T.load_ckpt(run / "ckpt.pt")
    assert state["done_stages"] == ["v"] and state["step"] == 5
    # Without stage v, no-vision-tower trains the decoder and leaves the tower alone.
    out2 = tmp_path / "out2"
    T.train(T.parse_args(["--run", str(tmp_path / "run2"), "--init", str(src), "--train", "no-vision-tower",
                          "--steps", "2", "--batch", "2", "--eval-every", "0", "--no-tqdm", "--augment", "0",
                          "--out", str(out2)]))
    tuned = tm.load_model(out2).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert any(k.startswith("model.") for k in changed)
    assert not any(k.startswith(("visual.blocks.", "visual.patch_embed.", "visual.pos_embed")) for k in changed)
