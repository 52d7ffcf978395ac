"""Qwen-Omni web chat: `python app.py [--model PATH] [--device cuda] [--port 7860] ...` (see --help);
`python app.py --backend openai --base-url URL` answers through an OpenAI-compatible server instead.

Thin by design: this file only lays out Gradio widgets and wires events; settings, upload checks, history
conversion, streaming and error wording live in `qwen_omni/webapp/session.py` (which never imports gradio).

Speech: with "Speak replies" on, the reply is also spoken (the checkpoint's talker for full Omni models, the
offline voice otherwise; voices from the loaded model) and its audio chunks stream into an autoplaying player
while the text is still being written; the whole spoken reply then stays in the chat as a playable message.

Talk tab (logic in `qwen_omni/webapp/talk.py`): the microphone streams chunks to `hear` outside the model's queue;
silero-vad ends each utterance with no click; the turn (its audio, plus a webcam frame when the camera streams)
runs `talk_reply` in the model's queue, spoken into the Talk player. Speech over a reply cancels it (barge-in) and
pauses the player; the state line shows listening / hearing / thinking / speaking; Stop ends the reply.

Events: the textbox's submit, the chat's retry and edit, and Talk replies are generator callbacks sharing one
queue (`concurrency_id="model"`), so tokens stream as they are produced and a waiting user sees a real position.
The textbox's stop button and the Talk tab's Stop cancel them (Gradio closes the generator, which closes the library
stream and frees the model at once); the chat's undo and clear skip the queue. UI events are private; the public
API is `/chat (message, history, [system, sampling..., speak, voice])`, streaming the updated history. Every flag
can also be given as an environment variable (QWEN_OMNI_MODEL, ..., GRADIO_SERVER_NAME/GRADIO_SERVER_PORT) for
Spaces.

Hugging Face Spaces (`python -m qwen_omni space` writes one): `spaces` is imported before anything imports torch.
On ZeroGPU the model is loaded onto `cuda` here, in the main process, talker included (ZeroGPU moves it onto a GPU
for each call), and the two functions that run the model (`gpu_callbacks`) run under `spaces.GPU` with a duration
grown from the requested new tokens and speech. They run in a forked worker: what they yield is pickled back (plain
lists, dicts, strings and WAV bytes; Gradio objects are made here), and what they change there is lost when the
call ends: the prefix cache (a follow-up turn is prefilled in full again) and anything loaded lazily. The history
lives in the browser, so no conversation state is lost. On CPU and ordinary GPU Spaces nothing of this changes.
"""
from __future__ import annotations

import os

# ZeroGPU's `spaces` patches torch when imported and refuses to start once CUDA is initialised, so it comes before
# qwen_omni (torch); off Spaces it is not imported here (settings.on_gpu still uses it when installed: inert there).
if os.environ.get("SPACE_ID") or os.environ.get("SYSTEM") == "spaces":
    try:
        import spaces  # noqa: F401
    except ImportError:
        if os.environ.get("SPACES_ZERO_GPU"):
            raise SystemExit("qwen-omni: ZeroGPU needs the `spaces` package in requirements.txt") from None

import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import gradio as gr  # noqa: E402

from qwen_omni import QwenOmniError  # noqa: E402
from qwen_omni.speech.offline_voice import join_wav  # noqa: E402
from qwen_omni.webapp import session as cs  # noqa: E402
from qwen_omni.webapp import settings as st  # noqa: E402
from qwen_omni.webapp import talk as tk  # noqa: E402
from qwen_omni.speech.vad import Endpointer  # noqa: E402

SPACE_MODEL: str | None = None  # the checkpoint when neither --model nor QWEN_OMNI_MODEL names one (set by `space`)

STREAM_AUDIO = shutil.which("ffmpeg") is not None  # Gradio encodes a streamed player's chunks with ffmpeg
PAUSE_TALK_PLAYER = "() => document.querySelectorAll('#qo-talk-player audio').forEach(a => a.pause())"
TALK_CHUNK = 0.25  # s of microphone audio per streamed chunk
CSS = "#qo-actions button {min-width: fit-content !important}  /* no clipped labels on a phone */"


def gpu_callbacks(session: cs.ChatSession, settings: st.Settings):
    """(submit_steps, regenerate_steps): the generators that run the model, under `spaces.GPU` where `spaces` is
    installed. They yield (history, warning, audio) tuples of plain values only, because on ZeroGPU they run in a
    forked worker whose yields are pickled back to this process."""
    def duration(sampling: cs.Sampling, *_) -> int:  # called with the decorated function's arguments
        return st.gpu_duration(min(int(sampling.max_new_tokens), settings.max_new_tokens), sampling.speak)

    @st.on_gpu(duration)
    def submit_steps(sampling: cs.Sampling, message, history, system, extra_files):
        yield from session.submit(message, history, system, sampling, extra_files, True)

    @st.on_gpu(duration)
    def regenerate_steps(sampling: cs.Sampling, history, system):
        yield from session.regenerate(history, system, sampling, True)

    return submit_steps, regenerate_steps


def build_demo(assistant, settings: st.Settings) -> gr.Blocks:
    session = cs.ChatSession(assistant, max_new_tokens=settings.max_new_tokens)
    submit_steps, regenerate_steps = gpu_callbacks(session, settings)

    voices = cs.voice_choices(assistant)

    def stream(steps):
        """Each (history, warning, audio) step as (history, is_first_step, audio), the warning as a toast."""
        held = []
        for i, (history, warning, audio) in enumerate(steps):
            if warning:
                gr.Warning(warning)
            if audio is not None and not STREAM_AUDIO:
                held.append(audio)
                audio = None
            # an audio chunk goes to the streaming player; text-only steps leave the player alone
            yield history, i == 0, (audio if audio is not None else gr.skip())
        if held:  # no ffmpeg: the player gets the whole spoken reply at the end
            yield gr.skip(), False, join_wav(held)

    def submit(message, cam_image, cam_video, history, system, temperature, top_p, top_k, max_new, seed, av,
               speak=False, voice="default"):
        sampling = cs.Sampling(temperature, top_p, top_k, max_new, seed, av, bool(speak), voice)
        extra = [f for f in (cam_image, cam_video) if f]
        for history, first, audio in stream(submit_steps(sampling, message, history, system, extra)):
            # the input box and camera are emptied once, so typing during the stream is not wiped
            yield (history, *((gr.MultimodalTextbox(value=None), None, None) if first else (gr.skip(),) * 3), audio)

    def regenerate(history, system, temperature, top_p, top_k, max_new, seed, av, speak=False, voice="default"):
        sampling = cs.Sampling(temperature, top_p, top_k, max_new, seed, av, bool(speak), voice)
        yield from ((h, a) for h, _, a in stream(regenerate_steps(sampling, history, system)))

    def retry(history, system, temperature, top_p, top_k, max_new, seed, av, speak, voice,
              retry_data: gr.RetryData):
        """The chat's retry icon: answer the user turn at `retry_data.index` again."""
        yield from regenerate(history[:retry_data.index + 1], system, temperature, top_p, top_k, max_new, seed, av,
                              speak, voice)

    def edit(history, system, temperature, top_p, top_k, max_new, seed, av, speak, voice, edit_data: gr.EditData):
        """A user message edited in place: the conversation up to it, with the new text, answered again."""
        yield from regenerate(cs.edit(history, edit_data.index, edit_data.value), system, temperature, top_p, top_k,
                              max_new, seed, av, speak, voice)

    def chat(message: dict, history: list[dict], system: str = "", temperature: float = 0.6, top_p: float = 0.95,
             top_k: int = 20, max_new_tokens: int = 512, seed: int = -1, use_audio_in_video: bool = True,
             speak: bool = False, voice: str = "default") -> Iterator[list[dict]]:
        """Answer `message` ({"text", "files"}) after `history` (Gradio messages); streams the updated history.
        A spoken reply (speak=True) ends with its audio as a file message."""
        sampling = cs.Sampling(temperature, top_p, top_k, max_new_tokens, seed, use_audio_in_video, speak, voice)
        for h, _warning, _audio in submit_steps(sampling, message, history, system, []):
            yield cs.api_history(h)

    def hear(chunk, talk, frame):
        """One microphone chunk (every TALK_CHUNK s): voice activity, end of turn, barge-in; the state line."""
        if talk is None:
            talk = tk.TalkSession(Endpointer(), cs.AUDIO_DIR)
        if frame is not None:
            talk.see(frame)
        actions = talk.hear(*chunk) if chunk is not None else []
        state = talk.state + (" · interrupted" if "barge_in" in actions else "")
        return talk, state, (talk.turns_detected if "turn" in actions else gr.skip())

    def talk_reply(talk, history, system, temperature, top_p, top_k, max_new, seed, voice):
        """Answer the turn `hear` detected, spoken into the Talk player; the state line follows it at once."""
        if talk is None:
            return
        sampling = cs.Sampling(temperature, top_p, top_k, max_new, seed, True, bool(voices), voice)
        held, shown = [], None
        for h, audio in talk.answer(assistant, history, system, sampling, settings.max_new_tokens):
            state = "thinking" if shown is None else ("speaking" if audio is not None else shown)
            if audio is not None and not STREAM_AUDIO:
                held.append(audio)
                audio = None
            yield h, (audio if audio is not None else gr.skip()), (state if state != shown else gr.skip())
            shown = state
        if held:
            yield gr.skip(), join_wav(held), gr.skip()

    def talk_stop_now(talk):
        if talk is not None:
            talk.stop()
        return "listening · stopped" if talk is not None else "off"

    def undo(history):
        history, message = cs.undo(history)
        return history, (message if message is not None else gr.skip())

    with gr.Blocks(title="Qwen-Omni", fill_height=True) as demo:
        gr.Markdown("### Qwen-Omni · ask about images, recordings and videos")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=320):
                chatbot = gr.Chatbot(
                    elem_id="qo-chat", label="Chat", height="58vh", buttons=["copy"], editable="user",
                    # a thinking model's reasoning as a collapsible thought; only for such models, because the
                    # option also splits each user turn's text from its files into two messages
                    reasoning_tags=[("<think>", "</think>")] if getattr(assistant, "reasoning_mode", None) is not None
                    else None,
                    placeholder="Attach an image, audio clip or video (paperclip or microphone) and ask about it, "
                                "or just type.")
                with gr.Tabs():
                    with gr.Tab("Type", elem_id="qo-type-tab"):
                        textbox = gr.MultimodalTextbox(
                            elem_id="qo-input", sources=["upload", "microphone"], file_types=["image", "audio", "video"],
                            file_count="multiple", placeholder="Ask something…", label="Message", show_label=False,
                            autofocus=True, stop_btn=True)
                        with gr.Accordion("Camera", open=False):
                            gr.Markdown("A photo or clip taken here is attached to your next message.")
                            with gr.Row():
                                cam_image = gr.Image(sources=["webcam"], type="filepath", label="Photo")
                                cam_video = gr.Video(sources=["webcam"], label="Clip")
                    with gr.Tab("Talk", elem_id="qo-talk-tab"):
                        gr.Markdown("Start the microphone and just talk: a pause ends your turn, and speaking over "
                                    "the reply interrupts it. With the camera on, its picture at the end of each "
                                    "question goes along.")
                        with gr.Row():
                            talk_state = gr.Textbox("off", label="State", interactive=False, elem_id="qo-talk-state",
                                                    min_width=0, scale=3)
                            talk_stop = gr.Button("Stop", variant="stop", elem_id="qo-talk-stop", min_width=0, scale=1)
                        mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy", label="Microphone",
                                       elem_id="qo-mic")
                        talk_player = gr.Audio(label="Reply", streaming=STREAM_AUDIO, autoplay=True, interactive=False,
                                               elem_id="qo-talk-player")
                        with gr.Accordion("Camera", open=False):
                            talk_cam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Camera",
                                                elem_id="qo-talk-cam")
                examples = cs.find_examples()
                if examples:
                    gr.Examples([[e] for e in examples], inputs=[textbox], label="Examples")
            with gr.Column(scale=1, min_width=260):
                system = gr.Textbox(label="System prompt", placeholder="(optional)", lines=3)
                with gr.Accordion("Sampling", open=True):
                    temperature = gr.Slider(0.0, 2.0, value=0.6, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                    top_k = gr.Slider(0, 100, value=20, step=1, label="Top-k (0 = off)")
                    max_new = gr.Slider(1, settings.max_new_tokens, value=min(512, settings.max_new_tokens),
                                        step=1, label="Max new tokens")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                av = gr.Checkbox(value=True, label="Use the audio track of videos")
                with gr.Group(visible=bool(voices)):
                    speak = gr.Checkbox(value=False, label="Speak replies", elem_id="qo-speak")
                    voice = gr.Dropdown(voices or ["default"], value=(voices or ["default"])[0], label="Voice",
                                        elem_id="qo-voice")
                    player = gr.Audio(label="Spoken reply", streaming=STREAM_AUDIO, autoplay=True,
                                      interactive=False, elem_id="qo-player")
                with gr.Accordion("Model card", open=False):
                    gr.Markdown(cs.model_card(assistant))

        # Every event that runs the model shares one queue ("model"), so a waiting user sees a real position. The UI's
        # events are private; the public API is /chat (message, history), below.
        knobs = [system, temperature, top_p, top_k, max_new, seed, av, speak, voice]
        model = {"concurrency_id": "model", "show_progress": "hidden", "api_visibility": "private"}
        ui_only = {"queue": False, "api_visibility": "private"}
        submit_evt = textbox.submit(submit, [textbox, cam_image, cam_video, chatbot, *knobs],
                                    [chatbot, textbox, cam_image, cam_video, player], **model)
        retry_evt = chatbot.retry(retry, [chatbot, *knobs], [chatbot, player], **model)
        edit_evt = chatbot.edit(edit, [chatbot, *knobs], [chatbot, player], **model)
        gr.api(chat, api_name="chat", concurrency_id="model")

        # Talk mode: the microphone's chunks are heard outside the model's queue (cheap, and barge-in must be heard
        # while a reply runs); a detected turn bumps `talk_turn`, whose change runs the spoken reply.
        talk, frame, talk_turn = gr.State(None), gr.State(None), gr.State(0)
        mic.stream(hear, [mic, talk, frame], [talk, talk_state, talk_turn], stream_every=TALK_CHUNK,
                   concurrency_limit=None, show_progress="hidden", api_visibility="private")
        talk_cam.stream(lambda f: f, [talk_cam], [frame], stream_every=0.5, concurrency_limit=None,
                        show_progress="hidden", api_visibility="private")
        talk_evt = talk_turn.change(talk_reply, [talk, chatbot, system, temperature, top_p, top_k, max_new, seed, voice],
                                    [chatbot, talk_player, talk_state], **model)
        talk_state.change(None, [talk_state], None, js="(s) => { if (s.includes('interrupted') || s.includes('stopped')) "
                          "(" + PAUSE_TALK_PLAYER + ")(); }")

        # One stop control per input mode (the textbox's own stop button, the Talk tab's); both end any reply.
        running = [submit_evt, retry_evt, edit_evt, talk_evt]
        textbox.stop(talk_stop_now, [talk], [talk_state], cancels=running, **ui_only)
        talk_stop.click(talk_stop_now, [talk], [talk_state], cancels=running, **ui_only)
        chatbot.undo(undo, [chatbot], [chatbot, textbox], cancels=running, **ui_only)
        chatbot.clear(talk_stop_now, [talk], [talk_state], cancels=running, **ui_only)  # the chat's trash icon
    return demo


def main(argv: list[str] | None = None, *, block: bool = True) -> gr.Blocks:
    if SPACE_MODEL and not os.environ.get("QWEN_OMNI_MODEL"):  # a folder beside app.py, else a Hub id
        local = Path(__file__).resolve().parent / SPACE_MODEL
        os.environ["QWEN_OMNI_MODEL"] = str(local) if local.is_dir() else SPACE_MODEL
    settings = st.parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks would flood the log
    print(f"qwen-omni: loading {settings.base_url or settings.model or 'the embedded default model'} ...", flush=True)
    try:
        assistant = st.load_assistant(settings)
    except QwenOmniError as e:
        sys.exit(f"qwen-omni: cannot start: {e}")
    demo = build_demo(assistant, settings)
    demo.queue(**st.queue_options(settings))
    try:
        cs.AUDIO_DIR.mkdir(parents=True, exist_ok=True)  # voice turns and spoken replies, served to the chat
        demo.launch(**st.launch_options(settings), prevent_thread_lock=True, theme=gr.themes.Soft(), css=CSS)
    except OSError as e:  # most often: the port is taken
        sys.exit(f"qwen-omni: cannot serve on {settings.host}:{settings.port}: {e}")
    dtype = str(assistant.dtype).replace("torch.", "")
    print(f"qwen-omni: {assistant.path.name} ({assistant.kind}) on {assistant.device}, {dtype}; "
          f"serving at http://{settings.host}:{demo.server_port}"
          + (f" and {demo.share_url}" if demo.share_url else ""), flush=True)
    if block:
        demo.block_thread()
    return demo


if __name__ == "__main__":
    main()
