"""Roles, grants and the principal of a request; the patterns every name given to the auth part must match."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import StringConstraints

from dlforge.common.errors import Forbidden

Role = Literal["viewer", "labeler", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "labeler", "operator", "admin")
"""Ordered: each role may do everything the ones before it may."""
RANK: dict[str, int] = {r: i for i, r in enumerate(ROLES)}

ALL_PROJECTS = "*"
"""A grant on ``*`` holds in every project (the local admin's)."""
DEFAULT_PROJECT = "default"

# Projects are ids like datasets' and runs'; user names become annotator names in the label history.
PROJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
USER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$"
TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.:@\-]{0,63}$"
RESERVED_USERS = frozenset({"simulated", "anonymous", "human", "unknown"})

ProjectName = Annotated[str, StringConstraints(pattern=PROJECT_PATTERN, max_length=64)]
GrantProject = Annotated[str, StringConstraints(pattern=rf"{PROJECT_PATTERN}|^\*$", max_length=64)]
UserName = Annotated[str, StringConstraints(pattern=USER_PATTERN, max_length=64)]
TokenName = Annotated[str, StringConstraints(pattern=TOKEN_NAME_PATTERN, max_length=64)]


def check_project(value: str) -> str:
    """``value`` if it is a valid project name, else ValueError saying the rule."""
    if not re.match(PROJECT_PATTERN, value):
        raise ValueError(f"project {value[:70]!r}: must be 1-64 letters, digits, '.', '_' or '-' (starting with a "
                         "letter or digit)")
    return value


def check_user(value: str) -> str:
    """``value`` if it is a valid, unreserved user name, else ValueError saying the rule."""
    if not re.match(USER_PATTERN, value):
        raise ValueError(f"user name {value[:70]!r}: must be 1-64 letters, digits, '.', '_', '@' or '-' (starting "
                         "with a letter or digit)")
    if value.lower() in RESERVED_USERS:
        raise ValueError(f"user name {value!r} is reserved")
    return value


def check_grants(grants: Mapping[str, str]) -> dict[str, Role]:
    """Grants ``{project or '*': role}`` checked (ValueError naming the bad entry)."""
    out: dict[str, Role] = {}
    for project, role in grants.items():
        if project != ALL_PROJECTS:
            check_project(project)
        if role not in RANK:
            raise ValueError(f"role {role!r} of project {project!r}: must be one of {', '.join(ROLES)}")
        out[project] = role  # type: ignore[assignment]
    return out


def at_least(role: str | None, needed: str) -> bool:
    return role is not None and RANK[role] >= RANK[needed]


def capped(grants: Mapping[str, Role], limit: Mapping[str, Role]) -> dict[str, Role]:
    """``grants`` held no higher than ``limit`` gives (a token never exceeds its user's current grants)."""
    out: dict[str, Role] = {}
    for project, role in grants.items():
        ceiling = limit.get(project) if project == ALL_PROJECTS else _best(limit.get(project),
                                                                          limit.get(ALL_PROJECTS))
        if ceiling is None:
            continue
        out[project] = role if RANK[role] <= RANK[ceiling] else ceiling
    return out


def _best(a: Role | None, b: Role | None) -> Role | None:
    if a is None or b is None:
        return a or b
    return a if RANK[a] >= RANK[b] else b


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the user, the token it used, and the roles it holds per project.

    ``kind`` is ``user`` (a person's API or session token), ``service`` (a service's token: it may
    only introspect) or ``anonymous`` (auth is off: every project, every role).
    """

    name: str
    token_id: str | None
    grants: Mapping[str, Role] = field(default_factory=dict)
    kind: Literal["user", "service", "anonymous"] = "user"
    expires_at: str | None = None

    @classmethod
    def anonymous(cls) -> Principal:
        """The principal of every request while ``DLFORGE_AUTH=off``: admin everywhere."""
        return cls(name="anonymous", token_id=None, grants={ALL_PROJECTS: "admin"}, kind="anonymous")

    @property
    def authenticated(self) -> bool:
        return self.kind != "anonymous"

    def role_in(self, project: str) -> Role | None:
        """The highest role held in ``project`` (through a grant on it or on ``*``)."""
        return _best(self.grants.get(project), self.grants.get(ALL_PROJECTS))

    def can(self, project: str, role: str) -> bool:
        return at_least(self.role_in(project), role)

    def can_somewhere(self, role: str) -> bool:
        """Whether some project grants at least ``role``."""
        return any(at_least(r, role) for r in self.grants.values())

    def projects(self, role: str = "viewer") -> set[str] | None:
        """The projects where the principal holds at least ``role``; None means every project."""
        if at_least(self.grants.get(ALL_PROJECTS), role):
            return None
        return {p for p, r in self.grants.items() if p != ALL_PROJECTS and at_least(r, role)}

    def require(self, project: str, role: str) -> None:
        """Raise Forbidden (403) unless the principal holds ``role`` in ``project``."""
        if not self.can(project, role):
            held = self.role_in(project)
            raise Forbidden(f"{self.name} is {held or 'not a member'} in project {project!r}; this needs {role}",
                            details={"project": project, "needed": role, "held": held})

    def public(self) -> dict[str, Any]:
        """The JSON form (``GET /auth/me``, introspection)."""
        return {"name": self.name, "token_id": self.token_id, "kind": self.kind, "projects": dict(self.grants),
                "expires_at": self.expires_at}

    @classmethod
    def from_public(cls, doc: Mapping[str, Any]) -> Principal:
        return cls(name=str(doc["name"]), token_id=doc.get("token_id"), grants=check_grants(doc.get("projects", {})),
                   kind=doc.get("kind", "user"), expires_at=doc.get("expires_at"))
