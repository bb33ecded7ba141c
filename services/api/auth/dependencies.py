"""Authentication and authorisation as FastAPI dependencies: `ViewerDep`, `OperatorDep`, `AdminDep`.

Every /api/v1 endpoint declares the scope it needs; 401 without a valid token, 403 when the
token's scope is too low, both as problem documents with a WWW-Authenticate header.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.auth.schemas import Scope
from services.api.auth.service import Principal, authenticate
from services.api.kit.problems import ProblemError

bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer nest_…`")


class Unauthenticated(ProblemError):
    status = 401
    title = "Unauthorized"
    kind = "unauthenticated"
    headers = {"WWW-Authenticate": 'Bearer realm="nest"'}


class Forbidden(ProblemError):
    status = 403
    title = "Forbidden"
    kind = "forbidden"


def require(scope: Scope) -> object:
    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if credentials is None or not credentials.credentials:
            raise Unauthenticated("an API token is required: Authorization: Bearer <token>")
        principal = await authenticate(
            request.app.state.db, request.app.state.token_cache, credentials.credentials
        )
        if principal is None:
            raise Unauthenticated("the token is unknown, expired or revoked")
        request.state.principal = principal
        if not principal.scope.allows(scope):
            raise Forbidden(
                f"this needs the {scope.value} scope; the token has {principal.scope.value}"
            )
        return principal

    return Depends(dependency)


ViewerDep = Annotated[Principal, require(Scope.VIEWER)]
OperatorDep = Annotated[Principal, require(Scope.OPERATOR)]
AdminDep = Annotated[Principal, require(Scope.ADMIN)]
