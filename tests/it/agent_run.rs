//! `drvault agent run`: the long-running host agent (issue "Continuous protection").
