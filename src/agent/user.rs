//! Guest users: resolving a name or `uid[:gid]` against the guest's /etc/passwd and
//! /etc/group, and the agent taking root's groups.

use super::say;

/// Gives the agent root's supplementary groups, so that a command run as root starts
/// the fast way (see `spawn`) with exactly the groups it should have. Called before the
/// agent starts its threads, so that glibc has no other thread to change them on.
pub fn take_root_groups() {
    if let Ok(root) = resolve_user("root") {
        let gids: Vec<nix::unistd::Gid> =
            root.groups.iter().map(|g| nix::unistd::Gid::from_raw(*g)).collect();
        if let Err(e) = nix::unistd::setgroups(&gids) {
            say(format_args!("setgroups for root: {e}"));
        }
    }
}

/// The warm-up's share (see [`super::main`]): reads root's user and groups as
/// [`take_root_groups`] does, without taking them.
pub fn warm_up() {
    let _ = resolve_user("root");
}

/// A guest user as its /etc/passwd and /etc/group say.
pub(super) struct User {
    pub(super) name: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) groups: Vec<u32>,
    pub(super) home: String,
}

/// Resolves a user name or `uid[:gid]` against the guest's /etc/passwd, with the
/// supplementary groups /etc/group gives the name.
pub(super) fn resolve_user(spec: &str) -> Result<User, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entries: Vec<Vec<&str>> =
        passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 6).collect();
    let spec = if spec.is_empty() { "root" } else { spec };
    let (name, group) = spec.split_once(':').unwrap_or((spec, ""));
    let numeric = name.parse::<u32>().ok();
    let found = entries.iter().find(|f| f[0] == name || numeric.is_some_and(|_| f[2] == name));
    let mut user = match (found, numeric) {
        (Some(f), _) => User {
            name: f[0].to_string(),
            uid: f[2].parse().map_err(|_| format!("bad uid for {name} in /etc/passwd"))?,
            gid: f[3].parse().map_err(|_| format!("bad gid for {name} in /etc/passwd"))?,
            groups: Vec::new(),
            home: f[5].to_string(),
        },
        (None, Some(uid)) => {
            User { name: name.to_string(), uid, gid: uid, groups: Vec::new(), home: "/".into() }
        }
        (None, None) if name == "root" => {
            User { name: "root".into(), uid: 0, gid: 0, groups: Vec::new(), home: "/root".into() }
        }
        (None, None) => return Err(format!("user {name:?} not found in the guest's /etc/passwd")),
    };
    if !group.is_empty() {
        user.gid = group.parse().map_err(|_| format!("group {group:?} is not a number"))?;
    }
    user.groups.push(user.gid);
    for line in std::fs::read_to_string("/etc/group").unwrap_or_default().lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[3].split(',').any(|m| m == user.name) {
            if let Ok(g) = f[2].parse::<u32>() {
                if !user.groups.contains(&g) {
                    user.groups.push(g);
                }
            }
        }
    }
    Ok(user)
}
