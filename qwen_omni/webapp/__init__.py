"""The web app's library side (no gradio here): the Hugging Face Space builder."""
