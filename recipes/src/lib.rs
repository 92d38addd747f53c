//! Recipes: each one a file that reads like its paper's algorithm, built on the engine in
//! `trainer`. Default configs live in `recipes/configs/<recipe>/`.

/// One line of `trainer recipes`.
pub struct RecipeInfo {
    pub name: &'static str,
    pub summary: &'static str,
}

/// Every recipe this build can run.
pub const ALL: &[RecipeInfo] = &[];
