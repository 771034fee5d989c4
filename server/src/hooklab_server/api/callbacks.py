"""``/v1/callbacks``: the websocket over which a client runs hook functions the server calls.

On connect the server sends ``{"kind": "hello", "session": id}``; requests name that session in
their callback hook entries. The server then sends a ``call`` per firing (its id, the callback,
the hook name and the activation as a tensor frame) and the client answers each with a
``reply`` (``outcome``: unchanged, replace with a ``tensor``, or error). Closing the socket ends
the session: forwards paused on it stop with ``callback_failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ..callbacks import CallbackFailed, decode_message, encode_message
from .edge import account_of
from .state import service

router = APIRouter()


@router.websocket("/v1/callbacks")
async def callbacks(websocket: WebSocket) -> None:
    sessions = service(websocket).callback_sessions
    account = account_of(websocket.scope)
    if sessions is None:
        await websocket.close(code=1008, reason="this server takes no client callbacks")
        return
    await websocket.accept()
    session = await sessions.open(account.name)
    try:
        await websocket.send_bytes(encode_message("hello", session=session.id))
        sender = asyncio.create_task(_send(websocket, sessions.messages(session)))
        try:
            while True:
                data = await websocket.receive_bytes()
                try:
                    message = decode_message(data)
                except CallbackFailed:
                    continue  # a garbled message answers nothing; its call times out
                if message["kind"] == "reply":
                    await sessions.reply(session, message)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await sessions.close(session)


async def _send(websocket: WebSocket, messages: AsyncIterator[bytes]) -> None:
    async for message in messages:
        await websocket.send_bytes(message)
