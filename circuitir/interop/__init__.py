"""Reading and writing other tools' files: OpenAI's released circuits, graph JSON, safetensors."""
