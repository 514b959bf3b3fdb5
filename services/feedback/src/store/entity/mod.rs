//! sea-orm entities of the feedback tables: the SQL of `store` names
//! tables and columns through them, never through strings.

pub mod answer_choices;
pub mod answers;
pub mod fatigue_policy;
pub mod fb_customers;
pub mod invitations;
pub mod response_segments;
pub mod responses;
pub mod survey_versions;
pub mod surveys;
