//! The demo tables: enterprise profiles drawn once, then each table written from them.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::distr::Distribution;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{LogNormal, Normal, Poisson};

use crate::codes::credit_code;
use crate::{DemoConfig, DemoError, DemoSummary, Result};

/// The tables the generator writes, in order.
pub const TABLES: [&str; 7] = [
    "enterprises",
    "tax_monthly",
    "social_insurance_monthly",
    "housing_fund_monthly",
    "court_cases",
    "admin_penalties",
    "consents",
];

/// Rows per Arrow batch while writing, and per Parquet row group, so that big scales stream
/// through bounded memory and scans can be split across cores.
const BATCH_ROWS: usize = 65_536;

/// Districts of Guangxi: division code, city, weight of enterprises registered there.
const DISTRICTS: [(&str, &str, u32); 26] = [
    ("450102", "南宁市", 9),
    ("450103", "南宁市", 10),
    ("450105", "南宁市", 7),
    ("450107", "南宁市", 6),
    ("450108", "南宁市", 5),
    ("450202", "柳州市", 5),
    ("450203", "柳州市", 4),
    ("450204", "柳州市", 4),
    ("450205", "柳州市", 3),
    ("450206", "柳州市", 2),
    ("450302", "桂林市", 4),
    ("450303", "桂林市", 3),
    ("450304", "桂林市", 2),
    ("450305", "桂林市", 2),
    ("450311", "桂林市", 1),
    ("450403", "梧州市", 3),
    ("450502", "北海市", 3),
    ("450602", "防城港市", 2),
    ("450702", "钦州市", 3),
    ("450802", "贵港市", 3),
    ("450902", "玉林市", 4),
    ("451002", "百色市", 2),
    ("451102", "贺州市", 2),
    ("451202", "河池市", 1),
    ("451302", "来宾市", 1),
    ("451402", "崇左市", 1),
];

/// GB/T 4754 sections with the share of small enterprises in each, and a name fragment.
const INDUSTRIES: [(&str, u32, &str); 17] = [
    ("A", 4, "农业"),
    ("B", 1, "矿业"),
    ("C", 18, "制造"),
    ("D", 1, "能源"),
    ("E", 9, "建筑工程"),
    ("F", 30, "商贸"),
    ("G", 6, "物流"),
    ("H", 8, "餐饮"),
    ("I", 5, "信息技术"),
    ("J", 1, "投资"),
    ("K", 3, "置业"),
    ("L", 7, "商务服务"),
    ("M", 3, "科技"),
    ("N", 1, "环境"),
    ("O", 2, "家政服务"),
    ("P", 1, "教育咨询"),
    ("R", 2, "文化传媒"),
];

const SURNAMES: [&str; 20] = [
    "李", "王", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭",
    "何", "林", "罗", "梁",
];
const GIVEN: [&str; 20] = [
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明",
    "超", "秀英", "华", "平",
];
const WORDS: [&str; 16] = [
    "桂盛", "宏达", "鑫源", "华南", "邕城", "八桂", "金穗", "创新", "联合", "恒泰", "绿城", "瑞丰",
    "南方", "壮乡", "顺达", "永安",
];

/// The hidden truth about one enterprise, from which every table is drawn.
struct Profile {
    credit_code: String,
    name: String,
    legal_rep: String,
    region_code: &'static str,
    city: &'static str,
    industry: &'static str,
    size_class: &'static str,
    registered_capital: f64,
    /// Days since 1970-01-01.
    established: i32,
    /// Index of the first month (0-based within the history) the enterprise existed.
    first_month: u32,
    status: &'static str,
    /// Standard-normal risk factor: higher is riskier.
    risk: f64,
    employees: f64,
    monthly_revenue: f64,
    tax_rating: &'static str,
    in_housing_fund: bool,
    consented: bool,
}

pub(crate) fn write_all(dir: &Path, config: &DemoConfig) -> Result<DemoSummary> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let history_start = history_start(config.months);
    let profiles: Vec<Profile> = (0..config.enterprises)
        .map(|i| draw_profile(&mut rng, i as u64, history_start, config.months))
        .collect();
    let months: Vec<String> = (0..config.months)
        .map(|m| month_label(history_start + m))
        .collect();

    let mut summary = DemoSummary::default();
    summary
        .tables
        .push(("enterprises", write_enterprises(dir, &profiles)?));
    // Every table gets its own stream of randomness, so changing one table leaves the others alone.
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x7a78);
    summary
        .tables
        .push(("tax_monthly", write_tax(dir, &profiles, &months, &mut rng)?));
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5151);
    summary.tables.push((
        "social_insurance_monthly",
        write_social_insurance(dir, &profiles, &months, &mut rng)?,
    ));
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x4f4e);
    summary.tables.push((
        "housing_fund_monthly",
        write_housing_fund(dir, &profiles, &months, &mut rng)?,
    ));
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0xc0c0);
    summary.tables.push((
        "court_cases",
        write_court(dir, &profiles, &months, &mut rng)?,
    ));
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0xadad);
    summary.tables.push((
        "admin_penalties",
        write_penalties(dir, &profiles, &months, &mut rng)?,
    ));
    summary
        .tables
        .push(("consents", write_consents(dir, &profiles)?));
    Ok(summary)
}

fn weighted<T: Copy>(rng: &mut impl Rng, items: &[(T, u32)]) -> T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total);
    for (item, weight) in items {
        if pick < *weight {
            return *item;
        }
        pick -= weight;
    }
    items[items.len() - 1].0
}

fn draw_profile(rng: &mut impl Rng, index: u64, history_start: u32, months: u32) -> Profile {
    let normal = Normal::new(0.0, 1.0).expect("valid normal");
    let districts: Vec<(usize, u32)> = DISTRICTS
        .iter()
        .enumerate()
        .map(|(i, d)| (i, d.2))
        .collect();
    let district = DISTRICTS[weighted(rng, &districts)];
    let industries: Vec<(usize, u32)> = INDUSTRIES
        .iter()
        .enumerate()
        .map(|(i, d)| (i, d.1))
        .collect();
    let industry = INDUSTRIES[weighted(rng, &industries)];
    let size_class = weighted(rng, &[("micro", 70), ("small", 25), ("medium", 5)]);
    let (employee_median, revenue_median, capital_median) = match size_class {
        "micro" => (4.0, 60_000.0, 500_000.0),
        "small" => (30.0, 600_000.0, 3_000_000.0),
        _ => (150.0, 4_000_000.0, 20_000_000.0),
    };
    let risk: f64 = normal.sample(rng);
    let employees = (LogNormal::new(f64::ln(employee_median), 0.5)
        .expect("valid lognormal")
        .sample(rng))
    .max(1.0);
    // Riskier enterprises earn somewhat less for their size.
    let monthly_revenue = LogNormal::new(f64::ln(revenue_median) - 0.15 * risk, 0.8)
        .expect("valid lognormal")
        .sample(rng);
    let registered_capital = (LogNormal::new(f64::ln(capital_median), 0.9)
        .expect("valid lognormal")
        .sample(rng)
        / 10_000.0)
        .round()
        * 10_000.0;
    // Establishment dates skew recent: most small enterprises are young.
    let age_years = (LogNormal::new(f64::ln(6.0), 0.7)
        .expect("valid lognormal")
        .sample(rng))
    .min(29.0);
    let history_end_day = days_from_civil(2024, 12, 31);
    let established = history_end_day - (age_years * 365.25) as i32;
    let (year, month, _) = civil_from_days(established);
    let established_month = (year as u32) * 12 + month - 1;
    let first_month = established_month.saturating_sub(history_start).min(months);
    let status = if risk > 2.2 {
        weighted(rng, &[("revoked", 3), ("suspended", 2), ("active", 5)])
    } else {
        weighted(rng, &[("active", 96), ("cancelled", 2), ("suspended", 2)])
    };
    let tax_rating = if established > history_end_day - 365 {
        "M"
    } else {
        let signal = risk + 0.5 * normal.sample(rng);
        match signal {
            s if s < -1.0 => "A",
            s if s < 0.8 => "B",
            s if s < 1.8 => "C",
            _ => "D",
        }
    };
    let surname = SURNAMES[rng.random_range(0..SURNAMES.len())];
    let given = GIVEN[rng.random_range(0..GIVEN.len())];
    let word = WORDS[rng.random_range(0..WORDS.len())];
    let in_housing_fund = rng.random_bool(match size_class {
        "micro" => 0.35,
        "small" => 0.7,
        _ => 0.95,
    });
    let consented = rng.random_bool(0.12);
    Profile {
        credit_code: credit_code(district.0, index),
        name: format!(
            "广西{}{}{}有限公司",
            word,
            industry.2,
            ["", "一", "二", "三"][(index % 4) as usize]
        ),
        legal_rep: format!("{surname}{given}"),
        region_code: district.0,
        city: district.1,
        industry: industry.0,
        size_class,
        registered_capital,
        established,
        first_month,
        status,
        risk,
        employees,
        monthly_revenue,
        tax_rating,
        in_housing_fund,
        consented,
    }
}

/// Months are counted as `year * 12 + month - 1`.
fn history_start(months: u32) -> u32 {
    2024 * 12 + 11 + 1 - months
}

fn month_label(month: u32) -> String {
    format!("{:04}-{:02}", month / 12, month % 12 + 1)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i32, month: u32, day: u32) -> i32 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = month as i32;
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day as i32 - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i32) -> (i32, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i32::from(month <= 2);
    (year, month, day)
}

/// Streams batches of one table into `<dir>/<table>/part-0.parquet`.
struct TableWriter {
    table: &'static str,
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    rows: usize,
}

impl TableWriter {
    fn create(dir: &Path, table: &'static str, fields: Vec<Field>) -> Result<Self> {
        let folder = dir.join(table);
        std::fs::create_dir_all(&folder).map_err(|source| DemoError::Io {
            path: folder.clone(),
            source,
        })?;
        let path = folder.join("part-0.parquet");
        let file = File::create(&path).map_err(|source| DemoError::Io { path, source })?;
        let schema = Arc::new(Schema::new(fields));
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(BATCH_ROWS * 2))
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(properties))
            .map_err(|source| DemoError::Parquet { table, source })?;
        Ok(TableWriter {
            table,
            writer,
            schema,
            rows: 0,
        })
    }

    fn write(&mut self, columns: Vec<ArrayRef>) -> Result<()> {
        let batch = RecordBatch::try_new(self.schema.clone(), columns).map_err(|source| {
            DemoError::Arrow {
                table: self.table,
                source,
            }
        })?;
        self.rows += batch.num_rows();
        self.writer
            .write(&batch)
            .map_err(|source| DemoError::Parquet {
                table: self.table,
                source,
            })
    }

    fn finish(self) -> Result<usize> {
        let table = self.table;
        self.writer
            .close()
            .map_err(|source| DemoError::Parquet { table, source })?;
        Ok(self.rows)
    }
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}
fn float(name: &str) -> Field {
    Field::new(name, DataType::Float64, false)
}
fn int(name: &str) -> Field {
    Field::new(name, DataType::Int64, false)
}
fn date(name: &str) -> Field {
    Field::new(name, DataType::Date32, false)
}

fn finish_string(mut builder: StringBuilder) -> ArrayRef {
    Arc::new(builder.finish())
}
fn finish_float(mut builder: Float64Builder) -> ArrayRef {
    Arc::new(builder.finish())
}
fn finish_int(mut builder: Int64Builder) -> ArrayRef {
    Arc::new(builder.finish())
}

fn write_enterprises(dir: &Path, profiles: &[Profile]) -> Result<usize> {
    let mut writer = TableWriter::create(
        dir,
        "enterprises",
        vec![
            utf8("credit_code"),
            utf8("name"),
            utf8("legal_rep"),
            utf8("region_code"),
            utf8("city"),
            utf8("industry"),
            utf8("size_class"),
            float("registered_capital"),
            date("established"),
            utf8("status"),
        ],
    )?;
    for chunk in profiles.chunks(BATCH_ROWS) {
        let mut code = StringBuilder::new();
        let mut name = StringBuilder::new();
        let mut rep = StringBuilder::new();
        let mut region = StringBuilder::new();
        let mut city = StringBuilder::new();
        let mut industry = StringBuilder::new();
        let mut size = StringBuilder::new();
        let mut capital = Float64Builder::new();
        let mut established = Date32Builder::new();
        let mut status = StringBuilder::new();
        for p in chunk {
            code.append_value(&p.credit_code);
            name.append_value(&p.name);
            rep.append_value(&p.legal_rep);
            region.append_value(p.region_code);
            city.append_value(p.city);
            industry.append_value(p.industry);
            size.append_value(p.size_class);
            capital.append_value(p.registered_capital);
            established.append_value(p.established);
            status.append_value(p.status);
        }
        writer.write(vec![
            finish_string(code),
            finish_string(name),
            finish_string(rep),
            finish_string(region),
            finish_string(city),
            finish_string(industry),
            finish_string(size),
            finish_float(capital),
            Arc::new(established.finish()),
            finish_string(status),
        ])?;
    }
    writer.finish()
}

/// Revenue multiplier for month `m` of the history: seasonality plus a risk-driven trend (risky
/// enterprises decline over the history, sound ones grow a little).
fn revenue_factor(p: &Profile, m: u32, months: u32) -> f64 {
    let calendar_month = m % 12;
    let season = 1.0 + 0.15 * ((calendar_month as f64) / 12.0 * std::f64::consts::TAU).cos();
    let progress = f64::from(m) / f64::from(months.max(1));
    let trend = 1.0 + progress * (0.08 - 0.18 * p.risk.max(-1.0));
    season * trend.max(0.05)
}

fn write_tax(
    dir: &Path,
    profiles: &[Profile],
    months: &[String],
    rng: &mut impl Rng,
) -> Result<usize> {
    let mut writer = TableWriter::create(
        dir,
        "tax_monthly",
        vec![
            utf8("credit_code"),
            utf8("month"),
            float("vat_paid"),
            float("revenue_declared"),
            utf8("tax_credit_rating"),
        ],
    )?;
    let noise = LogNormal::new(0.0, 0.3).expect("valid lognormal");
    let n_months = months.len() as u32;
    let mut rows = Rows::new(5);
    for p in profiles {
        for m in p.first_month..n_months {
            let revenue =
                (p.monthly_revenue * revenue_factor(p, m, n_months) * noise.sample(rng)).round();
            // Small-scale taxpayers pay about 1-3% of revenue; under-declaration grows with risk.
            let rate = 0.01 + 0.02 * rng.random::<f64>();
            let vat = (revenue * rate * (1.0 - 0.1 * p.risk.max(0.0)))
                .max(0.0)
                .round();
            rows.strings[0].append_value(&p.credit_code);
            rows.strings[1].append_value(&months[m as usize]);
            rows.floats[0].append_value(vat);
            rows.floats[1].append_value(revenue);
            rows.strings[2].append_value(p.tax_rating);
            rows.count += 1;
            if rows.count == BATCH_ROWS {
                let [c, mo, rating] = rows.take_strings::<3>();
                let [v, r] = rows.take_floats::<2>();
                writer.write(vec![c, mo, v, r, rating])?;
            }
        }
    }
    if rows.count > 0 {
        let [c, mo, rating] = rows.take_strings::<3>();
        let [v, r] = rows.take_floats::<2>();
        writer.write(vec![c, mo, v, r, rating])?;
    }
    writer.finish()
}

fn write_social_insurance(
    dir: &Path,
    profiles: &[Profile],
    months: &[String],
    rng: &mut impl Rng,
) -> Result<usize> {
    let mut writer = TableWriter::create(
        dir,
        "social_insurance_monthly",
        vec![
            utf8("credit_code"),
            utf8("month"),
            int("insured_headcount"),
            float("contribution_amount"),
            float("arrears"),
        ],
    )?;
    let n_months = months.len() as u32;
    let mut rows = Rows::new(2);
    let mut headcounts = Int64Builder::new();
    for p in profiles {
        let coverage = 0.55 + 0.4 * rng.random::<f64>() - 0.05 * p.risk.max(0.0);
        let wage_base = 3_500.0 + 4_000.0 * rng.random::<f64>();
        let mut arrears = 0.0;
        for m in p.first_month..n_months {
            let progress = f64::from(m) / f64::from(n_months);
            let headcount =
                (p.employees * coverage.max(0.2) * (1.0 + progress * (0.05 - 0.1 * p.risk)))
                    .round()
                    .max(1.0);
            let due = headcount * wage_base * 0.3;
            // Risky enterprises fall behind on contributions, and arrears accumulate.
            let behind = 1.0 / (1.0 + (-(p.risk - 1.3) * 2.5).exp());
            if rng.random::<f64>() < behind * 0.5 {
                arrears += due * (0.3 + 0.7 * rng.random::<f64>());
            } else if arrears > 0.0 && rng.random::<f64>() < 0.3 {
                arrears *= 0.5;
            }
            rows.strings[0].append_value(&p.credit_code);
            rows.strings[1].append_value(&months[m as usize]);
            headcounts.append_value(headcount as i64);
            rows.floats[0].append_value(due.round());
            rows.floats[1].append_value(arrears.round());
            rows.count += 1;
            if rows.count == BATCH_ROWS {
                let [c, mo] = rows.take_strings::<2>();
                let [due, arr] = rows.take_floats::<2>();
                writer.write(vec![
                    c,
                    mo,
                    finish_int(std::mem::take(&mut headcounts)),
                    due,
                    arr,
                ])?;
            }
        }
    }
    if rows.count > 0 {
        let [c, mo] = rows.take_strings::<2>();
        let [due, arr] = rows.take_floats::<2>();
        writer.write(vec![c, mo, finish_int(headcounts), due, arr])?;
    }
    writer.finish()
}

fn write_housing_fund(
    dir: &Path,
    profiles: &[Profile],
    months: &[String],
    rng: &mut impl Rng,
) -> Result<usize> {
    let mut writer = TableWriter::create(
        dir,
        "housing_fund_monthly",
        vec![
            utf8("credit_code"),
            utf8("month"),
            int("employees_covered"),
            float("contribution_amount"),
        ],
    )?;
    let n_months = months.len() as u32;
    let mut rows = Rows::new(2);
    let mut covered = Int64Builder::new();
    for p in profiles.iter().filter(|p| p.in_housing_fund) {
        let share = 0.4 + 0.5 * rng.random::<f64>();
        let wage_base = 3_500.0 + 5_000.0 * rng.random::<f64>();
        for m in p.first_month..n_months {
            // Risky enterprises skip deposits now and then.
            if p.risk > 1.0 && rng.random::<f64>() < 0.15 * p.risk {
                continue;
            }
            let employees = (p.employees * share).round().max(1.0);
            rows.strings[0].append_value(&p.credit_code);
            rows.strings[1].append_value(&months[m as usize]);
            covered.append_value(employees as i64);
            rows.floats[0].append_value((employees * wage_base * 0.24).round());
            rows.count += 1;
            if rows.count == BATCH_ROWS {
                let [c, mo] = rows.take_strings::<2>();
                let [amount] = rows.take_floats::<1>();
                writer.write(vec![
                    c,
                    mo,
                    finish_int(std::mem::take(&mut covered)),
                    amount,
                ])?;
            }
        }
    }
    if rows.count > 0 {
        let [c, mo] = rows.take_strings::<2>();
        let [amount] = rows.take_floats::<1>();
        writer.write(vec![c, mo, finish_int(covered), amount])?;
    }
    writer.finish()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn write_court(
    dir: &Path,
    profiles: &[Profile],
    months: &[String],
    rng: &mut impl Rng,
) -> Result<usize> {
    let mut writer = TableWriter::create(
        dir,
        "court_cases",
        vec![
            utf8("case_id"),
            utf8("credit_code"),
            utf8("counterparty_code"),
            utf8("filed_month"),
            utf8("case_type"),
            utf8("role"),
            float("amount"),
            utf8("status"),
            Field::new("dishonest_debtor", DataType::Boolean, false),
        ],
    )?;
    let n_months = months.len() as u32;
    let mut rows = Rows::new(7);
    let mut dishonest = BooleanBuilder::new();
    let mut case_number = 0u64;
    for p in profiles {
        let expected = 0.05 + 1.2 * sigmoid(2.0 * (p.risk - 1.0)) * f64::from(n_months) / 24.0;
        let cases = Poisson::new(expected).expect("positive mean").sample(rng) as u32;
        for _ in 0..cases {
            case_number += 1;
            let m = rng.random_range(p.first_month.min(n_months - 1)..n_months);
            let case_type = weighted(
                rng,
                &[
                    ("contract", 40),
                    ("loan", 25),
                    ("labor", 15),
                    ("lease", 12),
                    ("intellectual_property", 8),
                ],
            );
            let defendant = rng.random::<f64>() < sigmoid(p.risk);
            let status = weighted(rng, &[("pending", 30), ("closed", 55), ("enforcement", 15)]);
            let amount = LogNormal::new(f64::ln(80_000.0), 1.2)
                .expect("valid lognormal")
                .sample(rng)
                .round();
            let listed = defendant && status == "enforcement" && p.risk > 1.0;
            let year = 2000 + (m / 12) % 100;
            rows.strings[0].append_value(format!("({year})桂民初{case_number}号"));
            rows.strings[1].append_value(&p.credit_code);
            rows.strings[2].append_value(counterparty(profiles, p, case_number));
            rows.strings[3].append_value(&months[m as usize]);
            rows.strings[4].append_value(case_type);
            rows.strings[5].append_value(if defendant { "defendant" } else { "plaintiff" });
            rows.floats[0].append_value(amount);
            rows.strings[6].append_value(status);
            dishonest.append_value(listed);
            rows.count += 1;
            if rows.count == BATCH_ROWS {
                let [id, c, cp, mo, ty, role, st] = rows.take_strings::<7>();
                let [amount] = rows.take_floats::<1>();
                let flags: ArrayRef = Arc::new(std::mem::take(&mut dishonest).finish());
                writer.write(vec![id, c, cp, mo, ty, role, amount, st, flags])?;
            }
        }
    }
    if rows.count > 0 {
        let [id, c, cp, mo, ty, role, st] = rows.take_strings::<7>();
        let [amount] = rows.take_floats::<1>();
        let flags: ArrayRef = Arc::new(dishonest.finish());
        writer.write(vec![id, c, cp, mo, ty, role, amount, st, flags])?;
    }
    writer.finish()
}

/// The other party of a case: another enterprise of the register, chosen by a hash of the case
/// number (splitmix64) rather than the shared generator, so that adding the column left every
/// other generated value as it was.
fn counterparty<'a>(profiles: &'a [Profile], party: &Profile, case_number: u64) -> &'a str {
    let mut z = case_number.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let n = profiles.len() as u64;
    let mut index = (z % n) as usize;
    if profiles[index].credit_code == party.credit_code && profiles.len() > 1 {
        index = (index + 1) % profiles.len();
    }
    &profiles[index].credit_code
}

fn write_penalties(
    dir: &Path,
    profiles: &[Profile],
    months: &[String],
    rng: &mut impl Rng,
) -> Result<usize> {
    let mut writer = TableWriter::create(
        dir,
        "admin_penalties",
        vec![
            utf8("credit_code"),
            utf8("month"),
            utf8("penalty_type"),
            float("amount"),
        ],
    )?;
    let n_months = months.len() as u32;
    let mut rows = Rows::new(3);
    for p in profiles {
        let expected = 0.03 + 0.6 * sigmoid(2.0 * (p.risk - 1.2)) * f64::from(n_months) / 24.0;
        let penalties = Poisson::new(expected).expect("positive mean").sample(rng) as u32;
        for _ in 0..penalties {
            let m = rng.random_range(p.first_month.min(n_months - 1)..n_months);
            let kind = weighted(
                rng,
                &[
                    ("tax", 30),
                    ("product_quality", 20),
                    ("advertising", 15),
                    ("licensing", 20),
                    ("environment", 15),
                ],
            );
            let amount = (LogNormal::new(f64::ln(8_000.0), 1.0)
                .expect("valid lognormal")
                .sample(rng)
                / 100.0)
                .round()
                * 100.0;
            rows.strings[0].append_value(&p.credit_code);
            rows.strings[1].append_value(&months[m as usize]);
            rows.strings[2].append_value(kind);
            rows.floats[0].append_value(amount);
            rows.count += 1;
            if rows.count == BATCH_ROWS {
                let [c, mo, kind] = rows.take_strings::<3>();
                let [amount] = rows.take_floats::<1>();
                writer.write(vec![c, mo, kind, amount])?;
            }
        }
    }
    if rows.count > 0 {
        let [c, mo, kind] = rows.take_strings::<3>();
        let [amount] = rows.take_floats::<1>();
        writer.write(vec![c, mo, kind, amount])?;
    }
    writer.finish()
}

fn write_consents(dir: &Path, profiles: &[Profile]) -> Result<usize> {
    let mut writer = TableWriter::create(
        dir,
        "consents",
        vec![
            utf8("credit_code"),
            utf8("consumer_org"),
            utf8("purpose"),
            date("granted_at"),
            date("expires_at"),
        ],
    )?;
    let mut rows = Rows::new(3);
    let mut granted = Date32Builder::new();
    let mut expires = Date32Builder::new();
    let start = days_from_civil(2024, 1, 1);
    for (i, p) in profiles.iter().enumerate().filter(|(_, p)| p.consented) {
        let granted_at = start + (i as i32 * 37) % 366;
        rows.strings[0].append_value(&p.credit_code);
        rows.strings[1].append_value("bank_demo");
        rows.strings[2].append_value("credit_assessment");
        granted.append_value(granted_at);
        // Most consents run five years; one in ten ran one year and has lapsed, so the demo
        // shows expired consents being refused.
        let years = if i % 10 == 3 { 1 } else { 5 };
        expires.append_value(granted_at + 365 * years);
        rows.count += 1;
    }
    let [c, org, purpose] = rows.take_strings::<3>();
    writer.write(vec![
        c,
        org,
        purpose,
        Arc::new(granted.finish()),
        Arc::new(expires.finish()),
    ])?;
    writer.finish()
}

/// Column builders of one batch under construction.
struct Rows {
    strings: Vec<StringBuilder>,
    floats: Vec<Float64Builder>,
    count: usize,
}

impl Rows {
    fn new(strings: usize) -> Self {
        Rows {
            strings: (0..strings).map(|_| StringBuilder::new()).collect(),
            floats: (0..2).map(|_| Float64Builder::new()).collect(),
            count: 0,
        }
    }

    fn take_strings<const N: usize>(&mut self) -> [ArrayRef; N] {
        self.count = 0;
        std::array::from_fn(|i| finish_string(std::mem::take(&mut self.strings[i])))
    }

    fn take_floats<const N: usize>(&mut self) -> [ArrayRef; N] {
        std::array::from_fn(|i| finish_float(std::mem::take(&mut self.floats[i])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1000, 0, 1, 19_000, 20_089] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2024, 12, 31), 20_088);
    }

    #[test]
    fn history_ends_december_2024() {
        let start = history_start(24);
        assert_eq!(month_label(start), "2023-01");
        assert_eq!(month_label(start + 23), "2024-12");
    }
}
