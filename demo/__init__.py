"""The Gradio app's layout and wiring (no model maths: that lives in segcore and annotations).

``build_app(AppConfig.from_env())`` returns the queued Blocks; ``launch(demo, ...)`` serves it.
"""

from .app import build_app, launch
from .common import AppConfig
from .models import ModelStore

__all__ = ["AppConfig", "ModelStore", "build_app", "launch"]
