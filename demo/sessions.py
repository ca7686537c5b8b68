"""Who is asking: the owner of a request's uploads, remembered per browser across page reloads.

A browser keeps a random owner token in its own localStorage (``gr.BrowserState``); on page load it is
handed to :meth:`Owners.adopt`, which ties that page's Gradio session to the token, so uploads made
before a reload stay the browser's own. An API client (gradio_client) has no browser storage: its
session is its owner. Tokens are 256-bit secrets drawn by the server; a made-up token owns nothing.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections import OrderedDict

import gradio as gr

TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{43}")
MAX_SESSIONS = 20_000
"""Page sessions remembered (oldest forgotten first): bounds memory whatever the number of visits."""


def current_request() -> gr.Request | None:
    """The request being served in this thread (Gradio sets it around every event function)."""
    from gradio.context import LocalContext

    return LocalContext.request.get(None)


class Owners:
    """Page session -> owner token, for the sessions whose browser sent one."""

    def __init__(self, max_sessions: int = MAX_SESSIONS):
        self.max_sessions = max_sessions
        self._tokens: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(32)

    @staticmethod
    def _session(request: gr.Request | None) -> str | None:
        return getattr(request, "session_hash", None) or None

    def adopt(self, request: gr.Request | None, remembered) -> str:
        """Tie this page's session to the browser's token (a fresh one for a new browser); returns the token."""
        token = remembered.get("owner") if isinstance(remembered, dict) else None
        if not (isinstance(token, str) and TOKEN_PATTERN.fullmatch(token)):
            token = self.new_token()
        session = self._session(request)
        if session:
            with self._lock:
                self._tokens[session] = token
                self._tokens.move_to_end(session)
                while len(self._tokens) > self.max_sessions:
                    self._tokens.popitem(last=False)
        return token

    def forget(self, request: gr.Request | None) -> None:
        """The page was closed: its session will not come back (the token lives on in the browser)."""
        session = self._session(request)
        if session:
            with self._lock:
                self._tokens.pop(session, None)

    def owner(self, request: gr.Request | None = None) -> str | None:
        """The owner of ``request`` (default: the one being served): its browser's token, else its session."""
        request = request if request is not None else current_request()
        session = self._session(request)
        if session is None:
            return None
        with self._lock:
            return self._tokens.get(session, "session:" + session)
