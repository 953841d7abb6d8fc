//! Who an event belongs to: the actor registry and the three ways actors
//! enter it (the registration socket, config selectors, self-pipe discovery).

pub mod discovery;
pub mod identity;
pub mod model;
pub mod registration;
pub mod registry;
