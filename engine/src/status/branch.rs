//! Placeholder until the status-branch writer lands (being written now).

use std::path::Path;

/// Errors committing the status branch.
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    #[error("status branch not implemented yet")]
    NotYet,
}

pub fn commit_status(_repo: &git2::Repository, _branch: &str, _status_dir: &Path, _message: &str) -> Result<Option<git2::Oid>, BranchError> {
    Err(BranchError::NotYet)
}
