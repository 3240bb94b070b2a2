pub mod netns;
pub mod world;
