"""An Ollama Modelfile beside a GGUF export (placeholder, replaced below)."""
from __future__ import annotations
from pathlib import Path
def write_modelfile(folder: Path, files: dict[str, str]) -> None:
    lines = [f"FROM ./{files.get('model') or files['base']}"]
    if "adapter" in files:
        lines.append(f"ADAPTER ./{files['adapter']}")
    (folder / "Modelfile").write_text("\n".join(lines) + "\n")
