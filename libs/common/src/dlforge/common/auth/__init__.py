"""Accounts and access: users, hashed API tokens scoped to projects with roles, rate limits, an audit log.

Other parts use:

- :func:`principal_of` (``request.state.principal``): who sent the request; ``principal.name`` is the
  user, ``principal.require(project, role)`` raises 403, ``principal.projects(role)`` the projects a
  list may show (None: all);
- :func:`role` as a route's ``openapi_extra`` when it needs another role than the default (viewer
  for reads, operator for writes), :func:`resource` when a path parameter other than ``run_id`` /
  ``dataset_id`` names a run or dataset;
- :func:`register_resource` when a request creates a run or dataset; :func:`audit` to add facts to
  the request's audit entry.
"""

from dlforge.common.auth.authenticator import Authenticator, IntrospectingAuthenticator, StoreAuthenticator
from dlforge.common.auth.enforcement import (
    AuthMiddleware,
    AuthRuntime,
    audit,
    check_resource,
    check_stream_slot,
    principal_of,
    register_resource,
    reserved_resources,
    resource,
    role,
    still_allowed,
    stream_slot,
    visible_ids,
    visible_projects,
)
from dlforge.common.auth.model import (
    ALL_PROJECTS,
    DEFAULT_PROJECT,
    ROLES,
    Principal,
    ProjectName,
    Role,
    check_project,
)
from dlforge.common.auth.store import AuthStore

__all__ = [
    "ALL_PROJECTS",
    "DEFAULT_PROJECT",
    "ROLES",
    "AuthMiddleware",
    "AuthRuntime",
    "AuthStore",
    "Authenticator",
    "IntrospectingAuthenticator",
    "Principal",
    "ProjectName",
    "Role",
    "StoreAuthenticator",
    "audit",
    "check_project",
    "check_resource",
    "check_stream_slot",
    "principal_of",
    "register_resource",
    "reserved_resources",
    "resource",
    "role",
    "still_allowed",
    "stream_slot",
    "visible_ids",
    "visible_projects",
]
