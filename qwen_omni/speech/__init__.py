"""Spoken replies: the switch that picks who speaks (switch.py), the streaming pipeline both talker families
share, the thinker tap, the offline espeak-ng voice, shared vocoder layers, and one subpackage per family
(qwen25/, qwen3/), which never import each other. Imports engine, models and below."""
