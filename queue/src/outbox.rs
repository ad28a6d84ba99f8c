//! The Lua of the agent's build event outbox, kept here with every other script: the outbox is
//! a [`DueSet`](crate::DueSet) (claimed like any) whose entries are also ranked by status —
//! recording and settling need the status rules below, so they are scripts of their own.

use redis::Script;

use crate::timed_script;

/// `record`, `settle` and `extend` (see each `.lua` file for keys and arguments).
pub struct OutboxScripts {
    pub record: Script,
    pub settle: Script,
    pub extend: Script,
}

impl Default for OutboxScripts {
    fn default() -> Self {
        Self {
            record: timed_script(include_str!("outbox_record.lua")),
            settle: timed_script(include_str!("outbox_settle.lua")),
            extend: timed_script(include_str!("outbox_extend.lua")),
        }
    }
}
