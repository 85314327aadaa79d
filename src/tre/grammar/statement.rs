//! Before and around planning: what is refused from the SQL text or the
//! plan's kind alone, before the grammar reads the plan — text too long or
//! too complex to plan safely, anything but one SELECT (statements, DDL,
//! DML, EXPLAIN, DESCRIBE), and expressions nested deeper than the checks
//! after it can walk.

use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SQLOptions;

use super::{HIDDEN, outside, reserved_name};
use crate::tre::error::Refusal;

/// The refusal of anything that is not a query (DDL, DML, statements).
fn not_a_query() -> Refusal {
    Refusal::new(
        "statement_not_allowed",
        "only SELECT queries are allowed (no DDL, DML or statements)",
    )
}

/// Refuses SQL text that holds a name the boundary keeps for its hidden
/// columns, in any case and anywhere — a name, a string, a comment —
/// before anything is planned. The grammar refuses such names in the plan
/// too; this comes first, and also covers a name no plan holds (one the
/// planner cannot resolve, such as a hidden column of the compiled plan,
/// would otherwise be a plain SQL error).
pub fn reserved_text(sql: &str) -> Result<(), Refusal> {
    if sql.to_ascii_lowercase().contains(HIDDEN) {
        return Err(reserved_name());
    }
    Ok(())
}

/// The most terms — words, names, operators and parentheses; not literals,
/// commas or white space — a query may have. Every nesting level of an
/// expression costs at least one term, so this bounds the depth of the tree
/// the SQL parser and planner build (they recurse over it, and a chain of
/// ten thousand `OR`s overflowed the stack inside the planner before the
/// grammar ever saw it). A codelist of any length in `IN (…)` is free.
pub const MAX_TERMS: usize = 2000;

/// Refuses SQL text too long or too complex to plan safely, before it is
/// parsed. Tokenising is a loop; what does not tokenise is left for the
/// parser to report.
pub fn text_bounds(sql: &str, max_bytes: usize) -> Result<(), Refusal> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    if sql.len() > max_bytes {
        return Err(Refusal::new(
            "query_too_long",
            format!(
                "a query may be at most {} KiB of SQL (this one is {} KiB)",
                max_bytes / 1024,
                sql.len().div_ceil(1024)
            ),
        ));
    }
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize() else {
        return Ok(());
    };
    let terms = tokens
        .iter()
        .filter(|t| {
            !matches!(
                t,
                Token::Whitespace(_)
                    | Token::Comma
                    | Token::Number(..)
                    | Token::SingleQuotedString(_)
                    | Token::EOF
            )
        })
        .count();
    if terms > MAX_TERMS {
        return Err(Refusal::new(
            "query_too_complex",
            format!(
                "a query may have at most {MAX_TERMS} words, names and operators (this one has {terms}; values in IN (…) lists are not counted)"
            ),
        ));
    }
    Ok(())
}

/// How deeply an expression may nest. The grammar's own checks and the
/// compiler recurse over expressions; a left-deep chain of thousands of
/// `OR`s would overflow the stack and take the whole server down (an
/// unaudited denial of service). Nothing a researcher writes by hand comes
/// near this; a long list of alternatives is `IN (…)`, which is flat.
pub const MAX_EXPRESSION_DEPTH: usize = 128;

/// Refuses a plan with an expression nested deeper than
/// [`MAX_EXPRESSION_DEPTH`]. It walks with an explicit stack, so it is the
/// one walk that cannot overflow; it runs before anything else looks at
/// the plan's expressions.
pub fn expression_depth(plan: &LogicalPlan) -> Result<(), Refusal> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut deepest = 0;
    // Plans nest only as deep as the SQL parser's recursion limit allows.
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|root| {
            let mut stack = vec![(root, 1usize)];
            while let Some((e, depth)) = stack.pop() {
                deepest = deepest.max(depth);
                if depth > MAX_EXPRESSION_DEPTH {
                    return Ok(TreeNodeRecursion::Stop);
                }
                e.apply_children(|child| {
                    stack.push((child, depth + 1));
                    Ok(TreeNodeRecursion::Continue)
                })?;
            }
            Ok(TreeNodeRecursion::Continue)
        })
    });
    if deepest > MAX_EXPRESSION_DEPTH {
        return Err(outside(
            "expression_depth",
            format!(
                "expressions may nest at most {MAX_EXPRESSION_DEPTH} deep; write a list of alternatives as column IN (…)"
            ),
        ));
    }
    Ok(())
}

/// Refuses, from the SQL text alone, what no plan would name by its rule:
/// a statement the planner cannot plan over a view (`INSERT INTO patients
/// VALUES …` fails in the planner, not as a statement), and parentheses
/// nested past the SQL parser's recursion limit (the parser stops before
/// [`expression_depth`] could see the plan). A single query, EXPLAIN and
/// DESCRIBE go on to be planned and checked as plans; text that does not
/// parse is left for the planner to report as an SQL error.
pub fn statement_text(sql: &str) -> Result<(), Refusal> {
    use datafusion::sql::parser::{DFParser, Statement};
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    let statements = match DFParser::parse_sql(sql) {
        Ok(s) => s,
        Err(e) if e.to_string().contains("RecursionLimitExceeded") => {
            return Err(outside(
                "expression_depth",
                "parentheses and subqueries nest deeper than the SQL parser allows; write a list of alternatives as column IN (…)",
            ));
        }
        Err(_) => return Ok(()),
    };
    if statements.len() != 1 {
        return Ok(());
    }
    match &statements[0] {
        Statement::Statement(s)
            if matches!(
                **s,
                Sql::Query(_) | Sql::Explain { .. } | Sql::ExplainTable { .. }
            ) =>
        {
            Ok(())
        }
        Statement::Explain(_) => Ok(()),
        _ => Err(not_a_query()),
    }
}

/// Refuses what is not a query at all (EXPLAIN, statements, DDL), before
/// anything else: DataFusion turns analyzer errors into EXPLAIN output. A
/// query is then checked by DataFusion's own guard over every node and
/// subquery, so that a statement nested anywhere is refused by the same
/// rule as one at the top.
pub fn statement_kind(plan: &LogicalPlan) -> Result<(), Refusal> {
    match plan {
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => Err(Refusal::new(
            "explain_not_allowed",
            "EXPLAIN is not available in the TRE (plans can reveal what queries could not)",
        )),
        LogicalPlan::DescribeTable(_) => Err(Refusal::new(
            "describe_not_allowed",
            "DESCRIBE is not available; the views are documented in the README",
        )),
        LogicalPlan::Statement(_)
        | LogicalPlan::Dml(_)
        | LogicalPlan::Ddl(_)
        | LogicalPlan::Copy(_) => Err(not_a_query()),
        _ => SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(plan)
            .map_err(|_| not_a_query()),
    }
}
