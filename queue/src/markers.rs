//! The Lua of the agent's process executor launch markers (`{sd-agent}:launches…`), kept here
//! with every other script. See each `.lua` file for keys and arguments.

use redis::Script;

use crate::timed_script;

/// `beat`, `create`, `update`, `abandon` and `stop`.
pub struct MarkerScripts {
    pub beat: Script,
    pub create: Script,
    pub update: Script,
    pub abandon: Script,
    pub stop: Script,
}

impl Default for MarkerScripts {
    fn default() -> Self {
        Self {
            beat: timed_script(include_str!("markers_beat.lua")),
            create: Script::new(include_str!("markers_create.lua")),
            update: Script::new(include_str!("markers_update.lua")),
            abandon: Script::new(include_str!("markers_abandon.lua")),
            stop: Script::new(include_str!("markers_stop.lua")),
        }
    }
}
