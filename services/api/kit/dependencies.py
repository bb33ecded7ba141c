"""Typed dependencies on what the app's lifespan created (`async def`: a plain `def` would run
in the thread pool on every request)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from libs.common.bus import Bus
from libs.common.secrets import Sealer


async def _bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


async def _sealer(request: Request) -> Sealer:
    sealer: Sealer = request.app.state.sealer
    return sealer


BusDep = Annotated[Bus, Depends(_bus)]
SealerDep = Annotated[Sealer, Depends(_sealer)]
