"""Web shells over the engine: the Gradio app, the JSON API, ComfyUI-compatible routes, auth, metrics."""
