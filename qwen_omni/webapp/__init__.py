"""What app.py calls, never importing gradio: the chat session (uploads, history <-> messages, streaming,
error wording) and the settings (flags, environment, loading, queue and launch options). Imports serving,
assistant and below."""
