//! Errors that name the file and what in it is wrong.

use std::path::Path;

/// A model could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// Something in a model file is wrong or unsupported.
    #[error("{path}: {message}")]
    Model {
        /// The file or directory.
        path: String,
        /// What is wrong, naming the tensor, node or key.
        message: String,
    },
    /// A `.kir` file failed to parse (the message carries file, line and column).
    #[error("{0}")]
    Text(String),
}

impl FrontendError {
    /// An error about `path`.
    pub fn new(path: &Path, message: impl Into<String>) -> FrontendError {
        FrontendError::Model {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}
