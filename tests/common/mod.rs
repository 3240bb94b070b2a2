pub mod lite;
pub mod netns;
pub mod world;
