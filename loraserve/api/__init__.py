"""Workers AI's REST API (contract sections 1-4). Never imports torch: models arrive as `Backend`s."""

from loraserve.api.app import create_app
from loraserve.api.server import BackgroundServer, serve
from loraserve.api.settings import ServerSettings

__all__ = ["BackgroundServer", "ServerSettings", "create_app", "serve"]
