// What the signed-in user may do, from the grants the sign-in returned ({project: role}, "*" for every
// project). Only for showing and disabling controls: the server decides every request (401/403).
import { currentUser } from "./api.js";

export const ROLES = ["viewer", "labeler", "operator", "admin"];

/** The user's role in `project` (the better of its own grant and the "*" grant), or null. */
export function roleIn(project) {
  const grants = currentUser()?.projects || {};
  const held = [grants[project || "default"], grants["*"]].filter((r) => ROLES.includes(r));
  return held.length ? held.reduce((a, b) => (ROLES.indexOf(a) >= ROLES.indexOf(b) ? a : b)) : null;
}

/** Whether the user holds at least `role` in `project`. */
export function can(project, role) {
  const held = roleIn(project);
  return held !== null && ROLES.indexOf(held) >= ROLES.indexOf(role);
}
