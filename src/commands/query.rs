//! `gpdp query`: one question through the TRE boundary, the released
//! answer printed as a table, CSV or JSON.

use std::path::Path;

use super::cli::{Format, QueryArgs};
use super::tre_boundary;

pub fn run(args: QueryArgs) -> anyhow::Result<()> {
    let QueryArgs {
        store,
        project,
        user,
        token,
        tre,
        format,
        sql,
        sql_file,
    } = args;
    let sql = match (sql, sql_file) {
        (Some(sql), _) => sql,
        (None, Some(file)) => read_sql(&file)?,
        (None, None) => unreachable!("clap requires SQL or --sql-file"),
    };
    let boundary = tre_boundary(tre, &store)?;
    let request = gpdp::tre::Request {
        store,
        user,
        token,
        project,
        sql,
    };
    let released = gpdp::tre::query_blocking(&boundary, &request)?;
    match format {
        Format::Table => print!("{}", gpdp::tre::output::to_table(&released)),
        Format::Csv => print!("{}", gpdp::tre::output::to_csv(&released.result)),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&gpdp::tre::output::to_json(&released))?
        ),
    }
    Ok(())
}

/// The SQL of `gpdp query --sql-file` (`-`: standard input).
fn read_sql(file: &Path) -> anyhow::Result<String> {
    let read = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    };
    read.map_err(|e| gpdp::error::BadInput(format!("{}: {e}", file.display())).into())
}
