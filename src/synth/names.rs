//! Names for the synthetic patients: common English given and family names,
//! chosen by hand. They exist so that de-identification has something real to
//! remove (names in the patients table and inside free text); any resemblance
//! to a real person is coincidence.

pub const GIVEN_FEMALE: &[&str] = &[
    "Olivia",
    "Amelia",
    "Isla",
    "Ava",
    "Mia",
    "Ivy",
    "Lily",
    "Isabella",
    "Sophia",
    "Grace",
    "Freya",
    "Emily",
    "Poppy",
    "Ella",
    "Evie",
    "Charlotte",
    "Florence",
    "Alice",
    "Sienna",
    "Daisy",
    "Margaret",
    "Susan",
    "Patricia",
    "Elizabeth",
    "Sarah",
    "Karen",
    "Helen",
    "Julie",
    "Janet",
    "Joan",
    "Aisha",
    "Fatima",
    "Priya",
    "Zara",
    "Amara",
    "Chloe",
    "Hannah",
    "Ruth",
    "Anne",
    "Mary",
];

pub const GIVEN_MALE: &[&str] = &[
    "Noah", "Oliver", "George", "Arthur", "Muhammad", "Leo", "Harry", "Oscar", "Archie", "Henry",
    "Theodore", "Freddie", "Jack", "Charlie", "Thomas", "Jacob", "Alfie", "Finley", "Isaac",
    "Joshua", "David", "John", "Michael", "Paul", "Peter", "Richard", "James", "Robert", "Stephen",
    "Mark", "Ahmed", "Ravi", "Kwame", "Tomasz", "Daniel", "Samuel", "William", "Edward", "Ian",
    "Kevin",
];

pub const FAMILY: &[&str] = &[
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Robinson",
    "Wright", "Thompson", "Evans", "Walker", "Whitfield", "Roberts", "Green", "Hall", "Wood",
    "Jackson", "Clarke", "Patel", "Khan", "Ahmed", "Singh", "Begum", "Hussain", "Ali", "Shah",
    "Okafor", "Mensah", "Nowak", "Kowalski", "Murphy", "Kelly", "O'Brien", "Hughes", "Edwards",
    "Lewis", "Harris", "Martin", "Cooper", "King", "Baker", "Turner", "Hill", "Scott", "Moore",
    "Ward", "Morris", "Clark",
];
