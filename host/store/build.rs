//! `sqlx::migrate!` embeds each migration file and so notices edits, but not
//! a file added to the directory; this makes a new migration rebuild the crate.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
