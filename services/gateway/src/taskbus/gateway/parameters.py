"""Unknown query parameters are a 422: a misspelt criterion (`kinds=` for `kind=`) would
otherwise be ignored silently and answer more than the client asked for."""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from taskbus.gateway.problems import Problem


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def reject_unknown_query_parameters(request: Request) -> None:
    """A route dependency: 422 naming every query parameter the operation does not declare."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    unknown = sorted(set(request.query_params) - _query_names(route.dependant))
    if unknown:
        raise Problem(
            422,
            f"unknown query parameter(s): {', '.join(unknown)}",
            kind="validation-error",
            title="Invalid parameter",
            errors=[{"loc": ["query", name], "msg": "unknown parameter"} for name in unknown],
        )
