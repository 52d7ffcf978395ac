"""What app.py calls, never importing gradio: the chat session (uploads, history <-> messages, streaming,
error wording), the settings (flags, environment, loading, queue and launch options) and the Hugging Face Space
folder builder. Imports serving, assistant and below."""
